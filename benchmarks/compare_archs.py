"""Train every model.arch at the same size for the same wall-clock budget and compare them.

Each architecture trains from scratch on the bundled Shakespeare corpus (validation = whole works
held out), with the same preset, data order, optimizer and time budget; then each is evaluated on
the same validation windows. Prints one table and, with ``--json``, one JSON object per arch.

Columns:
  params        parameters (shared storage once)
  fwd MFLOP/tok forward FLOPs per token, counted by ``torch.utils.flop_counter`` on one training-mode
                forward of a full context with eager attention (so attention matmuls count)
  train tok/s   median training tokens per second over the run's steps (evals excluded)
  steps         optimizer steps done in the budget
  val bpb       bits per byte on the held-out works, as trained (top-k routing; for free: the
                CE + KL bound with encoder-inferred latents)
  decode bpb    the same, in decoding mode (causal routers; for free: latents from the prior)
  sample tok/s  greedy generation speed with the KV cache (batch 1, 200 tokens)
  key stat      each variant's own statistic at the final evaluation

Usage:

    python benchmarks/compare_archs.py --budget 3m
    python benchmarks/compare_archs.py --budget 60s --archs llama,mod --set train.batch_size=16

Runs are kept as ``cmp-<arch>-<time>`` in the data dir, so ``tfkit generate`` works on them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tfkit import config, hardware
from tfkit.config import ARCHS, parse_duration
from tfkit.data.loader import eval_batches
from tfkit.data.tokenfile import TokenFile
from tfkit.models import build_model
from tfkit.train import checkpoint as ckpt_mod
from tfkit.train.runs import run_lock
from tfkit.train.evaluate import evaluate
from tfkit.train.loop import TrainJob, _byte_lengths, run
from tfkit.train.sample import generate
from tfkit.train.setup import new_run, resolve_data

KEY_STATS = {
    "llama": [],
    "mod": ["processed", "predictor_acc"],
    "dtf": ["ce_rate", "cu_rate", "gate_mean"],
    "free": ["kl_bits", "at_floor"],
    "mhc": ["amax_fwd", "amax_bwd"],
}


def forward_flops_per_token(cfg: config.ModelConfig) -> float:
    """FLOPs of one training-mode forward over a (1, context_length) batch, per token."""
    torch.manual_seed(0)
    model = build_model(cfg, attention="eager").train()
    ids = torch.randint(0, cfg.vocab_size, (1, cfg.context_length))
    with FlopCounterMode(display=False) as counter:  # forward only: no backward is run
        model(ids, targets=ids)
    return counter.get_total_flops() / cfg.context_length


def sample_speed(model, device: str, n: int = 200) -> float:
    """Greedy tokens/s with the KV cache, batch 1, after a 20-token warm-up."""
    list(generate(model, [0], max_new_tokens=20, temperature=0, seed=0, device=device))
    t0 = time.perf_counter()
    got = len(list(generate(model, [0], max_new_tokens=n, temperature=0, seed=0, device=device)))
    return got / (time.perf_counter() - t0)


def compare(arch: str, args, stamp: str) -> dict:
    sets = [f"model.arch={arch}", f"train.max_time={args.budget}", "train.max_steps=1000000",
            "train.ckpt_interval=0", f"train.eval_interval={args.eval_interval}", *args.sets]
    cfg = resolve_data(config.load(preset=args.preset, overrides=sets))
    rt = hardware.resolve(cfg.system, hardware.detect())
    run_dir = new_run(cfg, f"cmp-{arch}-{stamp}", args.preset)
    with run_lock(run_dir):
        finished = run(TrainJob(cfg=cfg, runtime=rt, run_dir=run_dir, time_budget_s=parse_duration(args.budget)))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    rates = sorted(r["tokens_per_s"] for r in step_rows[5:] if r.get("tokens_per_s"))  # skip warm-up steps
    tps = rates[len(rates) // 2] if rates else None  # median: evals and checkpoints excluded

    model = build_model(cfg.model, attention=rt.attention)
    ckpt_mod.load_weights(model, ckpt_mod.find_checkpoint(run_dir), "cpu")
    model.to(rt.device).eval()
    val = TokenFile.open(cfg.data.val).tokens
    bl = _byte_lengths(run_dir)
    batches = lambda: eval_batches(val, cfg.train.batch_size, cfg.model.context_length, max_batches=args.eval_batches)
    trained = evaluate(model, batches(), rt.device, rt.precision, bl)
    with model.decoding(seed=0):
        decoded = evaluate(model, batches(), rt.device, rt.precision, bl)
    stats = {k: trained["stats"][k] for k in KEY_STATS[arch] if k in trained["stats"]}
    return {"arch": arch, "run": run_dir.name, "params": model.num_params(),
            "fwd_flops_per_token": forward_flops_per_token(cfg.model), "train_tokens_per_s": tps,
            "steps": finished.step, "val_loss": trained["loss"], "val_bpb": trained["bits_per_byte"],
            "decode_bpb": decoded["bits_per_byte"], "sample_tokens_per_s": sample_speed(model, rt.device),
            "stats": stats, "parts": trained["parts"], "final_eval_in_run": evals[-1]["bits_per_byte"] if evals else None}


def table(rows: list[dict]) -> str:
    head = ["arch", "params", "fwd MFLOP/tok", "train tok/s", "steps", "val bpb", "decode bpb", "sample tok/s", "key stat"]
    lines = [head]
    for r in rows:
        stat = ", ".join(f"{k} {v:.3g}" for k, v in r["stats"].items()) or "-"
        lines.append([r["arch"], f"{r['params'] / 1e6:.2f}M", f"{r['fwd_flops_per_token'] / 1e6:.2f}",
                      f"{r['train_tokens_per_s']:,.0f}" if r["train_tokens_per_s"] else "?", str(r["steps"]),
                      f"{r['val_bpb']:.4f}", f"{r['decode_bpb']:.4f}", f"{r['sample_tokens_per_s']:.0f}", stat])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="3m", help="wall-clock training budget per arch (90s, 3m, ...)")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ",".join(ARCHS))
    ap.add_argument("--set", action="append", default=[], dest="sets", help="config override for every arch")
    ap.add_argument("--eval-interval", type=int, default=0, help="evaluations during training (0 = only at the end)")
    ap.add_argument("--eval-batches", type=int, default=40, help="validation batches for the final comparison")
    ap.add_argument("--json", action="store_true", help="also print one JSON object per arch")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for arch in args.archs.split(","):
        t0 = time.perf_counter()
        rows.append(compare(arch.strip(), args, stamp))
        print(f"# {arch}: done in {time.perf_counter() - t0:.0f}s", flush=True)
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.preset}, {args.budget} per arch, {torch.get_num_threads()} threads, device "
          f"{hardware.resolve(config.SystemConfig(), hardware.detect()).device}")
    print(table(rows))


if __name__ == "__main__":
    main()
