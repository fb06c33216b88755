"""Terminal output shared by every command: the stderr console, JSON on stdout, tables.

Human text goes to stderr, data (``--json``) to stdout. ``NO_COLOR`` is honoured by Rich.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
"""Console for everything a person reads (messages, progress, dashboard)."""


def process_world_size() -> int:
    """The number of processes of this run under torchrun (``WORLD_SIZE``), 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0")) if process_world_size() > 1 else 0
    except ValueError:
        return 0


def quiet() -> bool:
    """True on ranks 1..N-1 of a distributed run: rank 0 speaks for all of them (errors excepted)."""
    return process_rank() != 0


def stderr_is_terminal() -> bool:
    """True when stderr is an interactive terminal (live dashboard, progress bars)."""
    return err.is_terminal and os.environ.get("TERM") != "dumb"


def info(message: str) -> None:
    """One human-readable line on stderr (Rich markup allowed); silent on ranks other than 0."""
    if not quiet():
        err.print(message)


def warn(message: str) -> None:
    """A `warning:` line on stderr; silent on ranks other than 0."""
    if not quiet():
        err.print(f"[yellow]warning:[/yellow] {message}")


def print_json(data: Any) -> None:
    """Data for programs: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    """``1234567`` -> ``1.23M``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def progress_bar(description: str, total: float | None, unit: str = "bytes"):
    """A Rich progress bar on stderr (transient on a terminal, silent otherwise).

    Use as a context manager: ``with progress_bar("encoding", size) as advance: advance(n)``.
    """
    from contextlib import contextmanager

    from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    @contextmanager
    def _bar():
        if not stderr_is_terminal():
            yield lambda n: None
            return
        cols = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
        if unit == "bytes":
            cols += [DownloadColumn(), TransferSpeedColumn()]
        cols.append(TimeRemainingColumn())
        with Progress(*cols, console=err, transient=True) as prog:
            task = prog.add_task(description, total=total)
            yield lambda n: prog.advance(task, n)

    return _bar()
