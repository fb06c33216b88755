"""tfkit's training step against Hugging Face `transformers`' LlamaForCausalLM (SDPA) at one shape.

Both models have the same shape and parameter count (tied embeddings, no biases), take the same
step (forward, backward, gradient clipping, PyTorch AdamW) on the same batch, and are timed in
alternating rounds in one process, so a busy machine slows both alike. Prints one JSON object
with tokens/s of each and the ratio. Needs `pip install transformers` (not a tfkit dependency).

    python benchmarks/peer_throughput.py                 # the issue's CPU shape, 2 threads, fp32
    python benchmarks/peer_throughput.py --rounds 8 --steps 3
    python benchmarks/peer_throughput.py --compile       # tfkit's step as `system.compile=true` runs it

The process switches of tfkit's CPU runtime (``Runtime.configure``: glibc malloc keeps freed
memory) are set first and apply to both models alike.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _tfkit_model(a):
    from tfkit.config import ModelConfig
    from tfkit.models import build_model

    cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads,
                      d_ff=a.d_ff, context_length=a.context, tie_embeddings=True)
    model = build_model(cfg, attention="sdpa")
    step_model = torch.compile(model, dynamic=False) if a.compile else model
    return model, lambda x: step_model(x, targets=x).loss


def _hf_model(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.d_ff, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=a.context,
                      tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(cfg)
    return model, lambda x: model(input_ids=x, labels=x).loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--compile", action="store_true", help="torch.compile tfkit's model (as system.compile=true)")
    a = ap.parse_args()
    from tfkit.hardware import Runtime

    switches = Runtime(device="cpu", precision="fp32", attention="sdpa", compile=a.compile).configure()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.context))
    runs = {}
    for name, make in (("tfkit", _tfkit_model), ("transformers", _hf_model)):
        model, loss_of = make(a)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = (model, loss_of, opt, [])

    def step(model, loss_of, opt):
        loss_of(x).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    compile_s = None
    for name, (model, loss_of, opt, _) in runs.items():  # warm up: allocator, kernels, compilation
        t0 = time.perf_counter()
        step(model, loss_of, opt)
        if name == "tfkit" and a.compile:
            compile_s = round(time.perf_counter() - t0, 1)
    for _ in range(a.rounds):
        for model, loss_of, opt, times in runs.values():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(model, loss_of, opt)
            times.append((time.perf_counter() - t0) / a.steps)
    tokens = a.batch * a.context
    out = {"shape": {k: getattr(a, k) for k in ("vocab", "d_model", "layers", "heads", "d_ff", "context", "batch")},
           "threads": a.threads, "torch": torch.__version__, "switches": switches, "tfkit_compiled": a.compile,
           "compile_seconds": compile_s}
    for name, (model, _, _, times) in runs.items():
        med = sorted(times)[len(times) // 2]
        out[name] = {"params": sum(p.numel() for p in model.parameters()), "seconds_per_step": round(med, 4),
                     "tokens_per_s": round(tokens / med, 1)}
    out["ratio"] = round(out["tfkit"]["tokens_per_s"] / out["transformers"]["tokens_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
