"""Option and argument types shared by several commands, so each is spelled and explained once.

Use them as annotations: ``def command(run: RunArg, json_out: JsonOpt = False, overrides: SetOpt = None)``.
Import-light on purpose (typer and the standard library; ``tfkit.config`` only inside the shell
completion callbacks), so ``tfkit --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def complete_presets(incomplete: str) -> list[str]:
    """Shell completion for ``--preset``: the shipped preset names and ``auto``."""
    from tfkit import config

    return [n for n in [*config.list_presets(), "auto"] if n.startswith(incomplete)]


def complete_set_keys(incomplete: str) -> list[str]:
    """Shell completion for ``--set``: every dotted config field as ``key=``."""
    from tfkit import config

    if "=" in incomplete:
        return []
    sections = set(config.RunConfig.model_fields)
    return [f"{p}=" for p in config.field_paths() if p not in sections and p.startswith(incomplete)]


def complete_runs(incomplete: str) -> list[str]:
    """Shell completion for a run: names of the folders in ``tfkit.paths.runs_dir()``."""
    from tfkit.paths import runs_dir

    try:
        names = sorted(p.name for p in runs_dir().iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete)]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
"""``--json``: data on stdout as one JSON document (human text stays on stderr)."""

PresetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--preset",
        help="Model size preset: nano, tiny, small, medium, large, or auto (pick by the detected hardware's "
        "memory; see `tfkit doctor`).",
        metavar="NAME|auto",
        autocompletion=complete_presets,
    ),
]
"""``--preset NAME|auto``: a preset from ``presets/`` or ``auto``."""

ConfigFileOpt = Annotated[
    Optional[Path],
    typer.Option(
        "-c",
        "--config",
        help="YAML config file (write one with `tfkit config init`); flags and --set override it.",
        metavar="FILE",
    ),
]
"""``-c/--config FILE``: a YAML config (checked by ``tfkit.config.load``, which names a missing file)."""

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="Override a config field, e.g. --set optim.lr=3e-4 (repeatable).",
        metavar="KEY=VALUE",
        autocompletion=complete_set_keys,
    ),
]
"""``--set KEY=VALUE`` (repeatable): config overrides, applied last."""

RunArg = Annotated[
    str,
    typer.Argument(
        help="Run name (see `tfkit list-models`) or path to a run folder.",
        metavar="RUN",
        autocompletion=complete_runs,
        show_default=False,
    ),
]
"""Positional ``RUN``: a run name under ``<data dir>/runs`` or a path to a run folder."""
