"""`tfkit eval`: loss, perplexity and bits per byte of a run on token or text data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt, RunArg
from tfkit.cli.output import info, print_json


def command(
    run: RunArg,
    data: Annotated[Optional[Path], typer.Option("--data", help="Prepared token file to evaluate on (made with the run's tokenizer).")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="Raw .txt/.jsonl file, tokenized with the run's tokenizer.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="latest, best or a step number.")] = "latest",
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", min=1, help="Evaluate at most this many batches (spread over the data). Default: all.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Sequences per batch. Default: the run's train.batch_size.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a run: loss (nats/token), perplexity and bits per byte.

    Without `--data` or `--text` it uses the run's validation data.

    Examples:

      tfkit eval my-run

      tfkit eval my-run --text hamlet.txt --json
    """
    import torch

    from tfkit.data.loader import eval_batches, hold_out
    from tfkit.data.tokenfile import TokenFile
    from tfkit.errors import ConfigError, DataError
    from tfkit.train.evaluate import evaluate
    from tfkit.train.setup import load_run, run_runtime

    if data is not None and text is not None:
        raise ConfigError("give either --data or --text, not both", "`--data` takes a token file, `--text` raw text")
    runtime = run_runtime(run)
    loaded = load_run(run, runtime.device, checkpoint, attention=runtime.attention,
                      on_warning=lambda s: info(f"warning: {s}"))
    model = loaded.model
    vocab = loaded.cfg.model.vocab_size
    tok = loaded.tokenizer
    if text is not None:
        if tok is None:
            raise DataError(f"run `{loaded.run_dir.name}` has no tokenizer.json, so it cannot read text",
                            "evaluate a prepared token file with `--data`")
        from tfkit.data.prepare import tokenize_temporary

        tf = tokenize_temporary([str(text)], tok)
        tokens, source, mask = tf.tokens, str(text), tf.mask_view()  # a memmap, not a list of chunks
    elif data is not None:
        tf = TokenFile.open(data)
        if tok is not None and tf.header.tokenizer_hash not in ("none", "") and tf.header.tokenizer_hash != tok.hash:
            raise DataError(f"`{data}` was made by a different tokenizer than run `{loaded.run_dir.name}`",
                            f"prepare it with `tfkit prepare … --tokenizer {loaded.run_dir / 'tokenizer.json'}`")
        tf.check_ids(vocab)
        tokens, source, mask = tf.tokens, str(data), tf.mask_view()
    else:
        d = loaded.cfg.data
        if not d.train and not d.val:
            raise DataError(f"run `{loaded.run_dir.name}` has no data of its own (it was imported)",
                            f"evaluate it on a token file with `--data F.bin` (made by `tfkit prepare … --tokenizer "
                            f"{loaded.run_dir / 'tokenizer.json'}`) or on raw text with `--text F.txt`")
        if d.val:
            tf = TokenFile.open(d.val)
            tokens, source, mask = tf.tokens, d.val, tf.mask_view()
        else:
            tf = TokenFile.open(d.train)
            train, tokens = hold_out(tf.tokens, d.val_fraction)
            mask = tf.mask_view()
            mask = mask.slice(len(train), len(mask)) if mask is not None else None
            source = f"{d.train} (held-out end)"
    loss_on = loaded.cfg.data.loss_on if mask is not None else "all"
    ctx = loaded.cfg.model.context_length
    batches = eval_batches(tokens, batch_size or loaded.cfg.train.batch_size, ctx, max_batches=max_batches,
                           mask=mask if loss_on == "assistant" else None)
    byte_lengths = torch.from_numpy(tok.byte_lengths().astype("int64")) if tok is not None else None
    r = evaluate(model, batches, runtime, byte_lengths)
    if not math.isfinite(r["loss"]):  # finite weights, yet NaN/Inf: an overflow at this precision
        from tfkit.errors import TfkitError

        raise TfkitError(f"run `{loaded.run_dir.name}` ({loaded.checkpoint.name}) gives a non-finite loss "
                         f"({r['loss']}) on {source} in {runtime.precision}",
                         "evaluate an earlier `--checkpoint STEP`; in bf16/fp16 an activation overflow does this")
    result = {"run": loaded.run_dir.name, "checkpoint": loaded.checkpoint.name, "step": loaded.step, "data": source,
              "loss": r["loss"], "perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"],
              "tokens": r["tokens"], "loss_on": loss_on, "bytes": r["bytes"], "parts": r["parts"], "stats": r["stats"]}
    bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "n/a (no tokenizer)"
    info(f"run {result['run']} ({result['checkpoint']}) on {source}")
    info(f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | bits per byte {bpb} | "
         f"{r['tokens']:,} tokens" + (" (assistant turns only)" if loss_on == "assistant" else ""))
    for k, v in {**r["parts"], **r["stats"]}.items():
        if k != "ce":
            info(f"{k} {v:.4g}")
    if json_out:
        print_json(result)
