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


def require_utf8(text: str, option: str) -> str:
    """Return ``text`` if it encodes as UTF-8; refuse it otherwise.

    On Linux and macOS Python decodes a command-line argument that is not valid UTF-8 with
    ``surrogateescape``: each bad byte becomes a lone surrogate (byte 0xff → U+DCFF), which the
    tokenizer and stdout cannot encode. This names the first such byte instead of crashing later.

    Args:
        text: the option's value as Python received it.
        option: the option as the user typed it, e.g. ``"--prompt"``.

    Raises:
        ConfigError: "--prompt is not valid UTF-8 text (byte 0xff at byte offset 3)"; a lone
            surrogate that is not an escaped byte is named as the character, e.g. U+D800.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        from tfkit.errors import ConfigError

        char = ord(text[exc.start])
        offset = len(text[:exc.start].encode("utf-8"))  # everything before the first bad character encodes
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ConfigError(f"{option} is not valid UTF-8 text ({what} at byte offset {offset})",
                          "pass UTF-8 text: set a UTF-8 terminal locale (e.g. `export LANG=C.UTF-8`) and "
                          "re-type or re-encode the text (`iconv -t UTF-8`)") from None
    return text
