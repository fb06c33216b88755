"""`tfkit export`: a run as a Hugging Face folder that transformers loads without custom code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt, RunArg
from tfkit.cli.output import info, print_json


def command(
    run: RunArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (it must not exist, or be empty).",
                                      metavar="DIR")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="latest, best or a step number.")] = "latest",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bf16, fp16 or fp32. Default: the dtype the "
                                                                 "checkpoint stores (fp32 for runs trained here).")] = None,
    max_shard_size: Annotated[float, typer.Option("--max-shard-gb", min=1e-6, help="Split the weights into "
                                                  "model-0000x-of-0000y.safetensors files of at most this many GiB.")] = 5.0,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a llama run as a Hugging Face model folder (Llama, Qwen2 or Qwen3 config).

    The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
    `AutoTokenizer.from_pretrained(DIR)`, so lm-evaluation-harness, vLLM and llama.cpp's
    converter can read it. mod, dtf, free and mhc runs have no transformers equivalent and are
    refused.

    Examples:

      tfkit export my-run --out my-model

      tfkit export my-run --out my-model --checkpoint best --dtype bf16
    """
    from tfkit.interop import hf
    from tfkit.interop.hf_runs import export_run

    done = export_run(run, out, checkpoint, dtype, int(max_shard_size * 1024**3), force,
                      on_warning=lambda s: info(f"warning: {s}"))
    size = sum(f.stat().st_size for f in done.files)
    if json_out:
        print_json({"run": run, "out": str(done.out), "family": done.family, "checkpoint": done.checkpoint.name,
                    "step": done.step, "dtype": done.dtype, "files": [f.name for f in done.files], "bytes": size})
    info(f"exported `{run}` ({done.checkpoint.name}, step {done.step}) to `{done.out}`: {done.family}, "
         f"{done.dtype}, {len(done.files)} weight file(s), {hf.size_text(size)}")
    info(f"load it: AutoModelForCausalLM.from_pretrained(\"{done.out}\")")
