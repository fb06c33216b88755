"""`tfkit split`: a token file → train and validation token files, cut at document boundaries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt
from tfkit.cli.output import info, print_json, warn


def _code(text: object) -> str:
    from rich.markup import escape

    return escape(f"`{text}`")


def command(
    path: Annotated[Path, typer.Argument(help="Token file to split (made by `tfkit prepare`).", metavar="FILE",
                                         show_default=False)],
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of tokens for validation, between 0 "
                                                "and 1; rounded up to whole documents.")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the shuffle that picks validation documents.")] = 0,
    train_out: Annotated[Optional[Path], typer.Option("--train-out", help="Training file to write "
                                                      "(default: <name>.train.bin beside FILE).", metavar="FILE")] = None,
    val_out: Annotated[Optional[Path], typer.Option("--val-out", help="Validation file to write "
                                                    "(default: <name>.val.bin beside FILE).", metavar="FILE")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", "-t", help="Optional: the tokenizer.json that made "
                                                      "FILE; records text bytes for bits per byte, and cuts a single "
                                                      "document at a line end.", metavar="FILE")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Split a token file into training and validation files at document boundaries.

    Validation gets whole documents, picked by a seeded shuffle until it holds at least --val-fraction of the tokens; both files keep the original document order. A file with a single document is cut inside it (with a warning).

    Examples:

      tfkit split corpus.bin --val-fraction 0.1

      tfkit split corpus.bin --val-fraction 0.05 --seed 1 --train-out train.bin --val-out val.bin
    """
    from tfkit.data.split import split_token_file
    from tfkit.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer) if tokenizer is not None else None
    r = split_token_file(path, val_fraction=val_fraction, seed=seed, train_out=train_out, val_out=val_out, tokenizer=tok)
    total = r.train_header.n_tokens + r.val_header.n_tokens
    if json_out:
        print_json({
            "train": {"path": str(r.train_path), **r.train_header.to_dict()},
            "val": {"path": str(r.val_path), **r.val_header.to_dict()},
            "val_share": round(r.val_header.n_tokens / total, 6),
            "n_val_documents": r.n_val_documents,
            "inside_document": r.inside_document,
        })
    if r.inside_document:
        warn(f"{_code(path)} could not be split at a document boundary (it holds a single document, or one "
             "dominates): the cut falls inside a document, so validation text continues training text")
    if json_out:
        return
    info(f"train {_code(r.train_path)}: {r.train_header.n_tokens:,} tokens, {r.train_header.n_documents:,} documents")
    info(f"val   {_code(r.val_path)}: {r.val_header.n_tokens:,} tokens ({r.val_header.n_tokens / total:.1%}), "
         f"{r.val_header.n_documents:,} documents")
