"""Training throughput of a preset on this machine: tokens/s, seconds/step, MFU when the peak is known.

Runs the same step the training loop runs (the runtime's precision, attention kernel and compile
choice; DDP or FSDP2 under torchrun), on random tokens, and prints one JSON object (rank 0 only).
The clock covers ``--steps`` steps after ``--warmup`` with one device sync at each end, so it
measures the device's pace, not the host's. Usage:

    python benchmarks/train_throughput.py --preset nano --steps 10
    python benchmarks/train_throughput.py --preset small --set train.batch_size=16
    torchrun --standalone --nproc-per-node 2 benchmarks/train_throughput.py --preset nano   # per rank count
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from tfkit import config, hardware
from tfkit.models import build_model
from tfkit.train import distributed
from tfkit.train.optim import build_optimizer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    cfg = config.load(preset=args.preset, overrides=[f"model.vocab_size={args.vocab_size}", *args.sets])
    hw = hardware.detect()
    world = distributed.env_world_size()
    rt = hardware.resolve(cfg.system, hw)
    rt = hardware.resolve_distributed(cfg, hw, rt, world, int(os.environ.get("LOCAL_RANK", "0")))
    rt.configure()
    dist = distributed.init(rt.device_type)
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = build_model(m, attention=rt.attention, grad_checkpointing=cfg.system.grad_checkpointing).to(rt.device)
    wrapped, _ = distributed.wrap(model, rt.distributed, dist, rt.device, rt.precision)
    opt = build_optimizer(model, cfg.optim, rt.device_type)
    step_model = torch.compile(wrapped, dynamic=False) if rt.compile else wrapped
    accum = distributed.accum_per_rank(t.grad_accum_steps, world)
    x = torch.randint(0, m.vocab_size, (t.batch_size, m.context_length), device=rt.device)

    def step() -> None:
        for i in range(accum):
            with distributed.accumulating(wrapped, rt.distributed, last=i == accum - 1):
                with rt.autocast:
                    out = step_model(x, targets=x)
                (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(rt.device)
    sps = (time.perf_counter() - t0) / args.steps
    tokens = world * accum * t.batch_size * m.context_length
    tps = tokens / sps
    peak = hardware.peak_flops(hw, rt)
    flops = model.flops_per_token(m.context_length)
    if dist.is_main:
        print(json.dumps({"preset": args.preset, "params": model.num_params(), "device": rt.device,
                          "precision": rt.precision, "attention": rt.attention, "compile": rt.compile,
                          "world_size": world, "distributed": rt.distributed, "threads": torch.get_num_threads(),
                          "tokens_per_step": tokens, "seconds_per_step": round(sps, 4), "tokens_per_s": round(tps, 1),
                          "tokens_per_s_per_rank": round(tps / world, 1),
                          "achieved_tflops": round(tps * flops / 1e12, 4),
                          "mfu": round(tps * flops / (peak * world), 4) if peak else None}))
    dist.close()


if __name__ == "__main__":
    main()
