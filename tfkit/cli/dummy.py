"""`tfkit dummy-data`: a token file of uniformly random ids, for smoke tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tfkit.cli.options import JsonOpt
from tfkit.cli.output import info, print_json


def command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Token file to write.", metavar="FILE")] = Path("dummy.bin"),
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Number of tokens to write.")] = 1_000_000,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Ids are drawn uniformly from [0, vocab size).")] = 4096,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed; the same seed gives the same file.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Write random tokens in the token-file format, for smoke tests.

    The file has no tokenizer (hash "none"); train on it with `--train-data`.

    Examples:

      tfkit dummy-data --out dummy.bin --tokens 1000000 --vocab-size 4096

      tfkit dummy-data --out tiny.bin --tokens 20000 --vocab-size 100 --seed 1
    """
    from rich.markup import escape

    from tfkit.data.dummy import make_dummy
    from tfkit.errors import DataError

    if out.is_dir():
        raise DataError(f"`{out}` is a folder", "give `--out` a file name such as dummy.bin")
    h = make_dummy(out, tokens, vocab_size, seed=seed)
    if json_out:
        print_json({"path": str(out), **h.to_dict()})
        return
    info(f"wrote {escape(f'`{out}`')}: {h.n_tokens:,} random tokens, vocab size {h.vocab_size}, {h.dtype}, seed {seed}")
