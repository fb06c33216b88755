"""Training throughput of a preset on this machine: tokens/s, seconds/step, MFU when the peak is known.

Prints one JSON object per configuration. Usage:

    python benchmarks/train_throughput.py --preset nano --steps 10
    python benchmarks/train_throughput.py --preset tiny --set train.batch_size=8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tfkit import config, hardware
from tfkit.models import build_model
from tfkit.train.evaluate import autocast_context
from tfkit.train.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    cfg = config.load(preset=args.preset, overrides=[f"model.vocab_size={args.vocab_size}", *args.sets])
    hw = hardware.detect()
    rt = hardware.resolve(cfg.system, hw)
    m, t = cfg.model, cfg.train
    model = build_model(m, attention=rt.attention, grad_checkpointing=cfg.system.grad_checkpointing).to(rt.device)
    opt = build_optimizer(model, cfg.optim, rt.device_type)
    step_model = torch.compile(model) if rt.compile else model
    x = torch.randint(0, m.vocab_size, (t.batch_size, m.context_length), device=rt.device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for _ in range(t.grad_accum_steps):
            with autocast_context(rt.device, rt.precision):
                out = step_model(x, targets=x)
            (out.loss / t.grad_accum_steps).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rt.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    sps = sorted(times)[len(times) // 2]
    tokens = t.batch_size * m.context_length * t.grad_accum_steps
    tps = tokens / sps
    peak = hardware.peak_flops(hw, rt)
    flops = model.flops_per_token(m.context_length)
    print(json.dumps({"preset": args.preset, "params": model.num_params(), "device": rt.device,
                      "precision": rt.precision, "threads": torch.get_num_threads(), "tokens_per_step": tokens,
                      "seconds_per_step": round(sps, 4), "tokens_per_s": round(tps, 1),
                      "achieved_tflops": round(tps * flops / 1e12, 4),
                      "mfu": round(tps * flops / peak, 4) if peak else None}))


if __name__ == "__main__":
    main()
