"""`tfkit import`: a Hugging Face model (folder or cached repo id) as a tfkit run."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt
from tfkit.cli.output import info, print_json, progress_bar


def command(
    source: Annotated[str, typer.Argument(help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json), "
                                               "or a repo id in the local Hugging Face cache such as Qwen/Qwen2.5-0.5B.",
                                          metavar="SOURCE")],
    name: Annotated[Optional[str], typer.Option("--name", help="Run name. Default: the last part of SOURCE.")] = None,
    context_length: Annotated[Optional[int], typer.Option(
        "--context-length", min=2, help="Tokens per training sequence of the run (model.context_length). "
        "Default: the model's max_position_embeddings, at most 2048.")] = None,
    download: Annotated[bool, typer.Option("--download", help="Download SOURCE from the Hugging Face Hub when it is "
                                                              "not in the local cache (needs the internet).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make a tfkit run from a pretrained Llama, Mistral, Qwen2/Qwen2.5 or Qwen3 model.

    The run holds the model's config, its own tokenizer and a step-0 checkpoint, so `eval`,
    `generate`, `export` and `train --init-from RUN` work on it. Mixtures of experts,
    sliding-window attention and unknown rope_scaling types are refused, never loaded wrongly.

    Examples:

      tfkit import ./Qwen2.5-0.5B --name qwen

      tfkit import Qwen/Qwen2.5-0.5B

      tfkit train --init-from qwen --set model.arch=dtf --train-data data.bin --set model.context_length=512
    """
    from tfkit.interop import hf
    from tfkit.interop.hf_runs import import_run

    with progress_bar("reading weights", None) as advance:
        done = import_run(source, name, context_length, download, on_status=info, on_progress=advance)
    m, run = done.model, done.run_dir.name
    summary = {"run": run, "path": str(done.run_dir), "source": source, "family": m.family, "params": done.params,
               "dtype": m.dtype, "context_length": m.model.context_length, "max_position_embeddings": m.max_positions,
               "vocab_size": m.model.vocab_size, "weights_bytes": done.weight_bytes}
    if json_out:
        print_json(summary)
    info(f"imported {m.family} model `{source}` as run `{run}`: {done.params:,} parameters, {m.dtype} "
         f"({hf.size_text(done.weight_bytes)}), context_length {m.model.context_length}"
         + (f" (the model allows {m.max_positions}; `--context-length N` sets it)"
            if m.max_positions > m.model.context_length else ""))
    info(f"try it: tfkit generate {run} --prompt \"Hello\"")
