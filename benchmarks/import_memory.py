"""Peak memory and time of `tfkit import` (and of loading the run for `eval`) on a Qwen2.5-0.5B-shaped
model stored in bf16, built offline with random weights by `transformers` (needs `tfkit[hf]`).

The promise checked: a 0.5B import fits this 24 GB CPU machine without holding two fp32 copies;
bf16 weights stay bf16 on disk. Each tfkit step runs in a fresh process, whose peak resident
memory (``ru_maxrss``) is printed with the weights' size, as one JSON object.

    python benchmarks/import_memory.py                # the Qwen2.5-0.5B shape (494M parameters)
    python benchmarks/import_memory.py --layers 4     # a quicker, smaller check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import resource, sys, time, json
t = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - t,
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def _measure(body: str, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD.format(body=body)], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    a = p.parse_args()

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    work = Path(tempfile.mkdtemp(prefix="tfkit-import-bench-"))
    src = work / "qwen"
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=a.layers,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=0)
    t = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(src)
    params = sum(p.numel() for p in model.parameters())
    del model
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(src)
    built = time.perf_counter() - t

    env = {**os.environ, "TFKIT_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    imp = _measure(f"from tfkit.interop.hf_runs import import_run; import_run({str(src)!r}, 'qwen')", env)
    load = _measure("from tfkit.train.setup import load_run; load_run('qwen')", env)
    ckpt = work / "home/runs/qwen/checkpoints/step-00000000/model.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as fh:
        dtypes = sorted({str(fh.get_slice(k).get_dtype()) for k in fh.keys()})
    print(json.dumps({
        "params": params, "layers": a.layers, "build_with_transformers_s": round(built, 1),
        "source_bytes_gib": round(sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30, 3),
        "run_checkpoint_gib": round(ckpt.stat().st_size / 2**30, 3), "run_checkpoint_dtypes": dtypes,
        "fp32_copy_gib": round(params * 4 / 2**30, 3),
        "import": {k: round(v, 2) for k, v in imp.items()},
        "load_for_eval_fp32": {k: round(v, 2) for k, v in load.items()},
        "this_process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
