"""`tfkit generate`: stream text from a trained run."""

from __future__ import annotations

import math
import os
import sys
from typing import Annotated, Optional

import typer

from tfkit.cli.options import RunArg, require_utf8
from tfkit.cli.output import info, print_json


def command(
    run: RunArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue. Empty = start a new document.")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling: smallest set of tokens with probability >= p.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for reproducible samples.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="latest, best or a step number.")] = "latest",
    stop_at_eot: Annotated[bool, typer.Option("--stop-at-eot/--no-stop-at-eot", " /--ignore-eos",
                                              help="Stop at the end-of-text and end-of-turn tokens "
                                                   "(--ignore-eos: generate all --max-new-tokens).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document at the end (prompt and input ids, "
                                                          "generated text and token ids) instead of streaming text.")] = False,
) -> None:
    """Generate text from a run, streaming tokens as they are produced (with a KV cache).

    The prompt and its continuation go to stdout; notes go to stderr.

    Examples:

      tfkit generate my-run --prompt "ROMEO:" --max-new-tokens 100

      tfkit generate my-run -p "To be" --temperature 0 --seed 1
    """
    from tfkit.errors import ConfigError, DataError

    if math.isnan(temperature) or temperature < 0:
        raise ConfigError(f"--temperature {temperature} must be a number >= 0", "use 0 for greedy, 0.7-1.0 to sample")
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be positive", "write e.g. `--max-new-tokens 200`")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k {top_k} must be at least 1", "write e.g. `--top-k 50`")
    if top_p is not None and not (0 < top_p <= 1):
        raise ConfigError(f"--top-p {top_p} must lie in (0, 1]", "write e.g. `--top-p 0.9`")
    require_utf8(prompt, "--prompt")  # before loading the run: a bad prompt is reported whatever RUN is

    from tfkit.train.sample import generate
    from tfkit.train.setup import load_run, run_runtime

    runtime = run_runtime(run)
    loaded = load_run(run, runtime.device, checkpoint, attention=runtime.attention,
                      on_warning=lambda s: info(f"warning: {s}"))
    tok = loaded.tokenizer
    if tok is None:
        raise DataError(f"run `{loaded.run_dir.name}` has no tokenizer.json, so it cannot turn tokens into text",
                        "train with `--tokenizer tokenizer.json` to generate text")
    model = loaded.model
    ids = tok.encode(prompt) if prompt else []
    ids = [tok.bos_id] + ids  # the model's begin-of-text token (tfkit's tokenizers: end-of-text)
    info(f"run {loaded.run_dir.name} ({loaded.checkpoint.name}), {runtime.device}; temperature {temperature}"
         + (f", top-k {top_k}" if top_k else "") + (f", top-p {top_p}" if top_p else ""))
    out = open(os.devnull, "w") if json_out else sys.stdout
    out.write(prompt)
    out.flush()
    generated: list[int] = []
    shown = ""
    end_of_turn = tok.token_to_id("<|end|>")  # tfkit's chat format; imported models list theirs in stop_ids
    stops = (tok.stop_ids + ((end_of_turn,) if end_of_turn is not None else ())) if stop_at_eot else ()
    tokens = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, stop_ids=stops, device=runtime.device)
    for token in _under(runtime.autocast, tokens):
        if token in stops:
            break
        generated.append(token)
        text = tok.decode(generated)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tok.decode(generated)
    out.write(text[len(shown):] + "\n")
    out.flush()
    if json_out:
        print_json({"run": loaded.run_dir.name, "checkpoint": loaded.checkpoint.name, "prompt": prompt,
                    "input_ids": ids, "text": text, "token_ids": generated})


def _under(context, items):
    """Iterate ``items`` with ``context`` (the runtime's autocast) entered around each step only, so
    the context never stays open while the caller writes."""
    it = iter(items)
    while True:
        with context:
            try:
                item = next(it)
            except StopIteration:
                return
        yield item
