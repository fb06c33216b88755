"""`tfkit config init` and `tfkit config show`: write or print a complete, commented config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tfkit.cli.options import ConfigFileOpt, SetOpt
from tfkit.cli.output import info

app = typer.Typer(help="Write or inspect config files.", no_args_is_help=True)

_PresetName = Annotated[Optional[str], typer.Option("--preset", help="Start from this preset (nano, tiny, small, medium, large).")]


@app.command("init")
def init(
    preset: _PresetName = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the YAML config.")] = Path("tfkit.yaml"),
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a complete YAML config, every field with its description as a comment.

    Examples:

      tfkit config init --preset nano

      tfkit config init --preset tiny --set model.context_length=1024 --out tiny.yaml
    """
    from tfkit import config
    from tfkit.errors import ConfigError

    if preset == "auto":
        raise ConfigError("`config init` needs a named preset, not auto", f"presets: {', '.join(config.list_presets())}")
    cfg = config.load(None, preset, overrides)
    if out.exists() and not force:
        raise ConfigError(f"`{out}` already exists", "pass `--force` to overwrite it, or choose another `--out`")
    header = (f"tfkit config{f' from preset {preset}' if preset else ''}. Train with: tfkit train -c {out}\n"
              "Empty values mean: decided automatically (see each comment).")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(config.to_yaml(cfg, header))
    tmp.replace(out)
    info(f"wrote {out} ({'preset ' + preset if preset else 'defaults'}); train with: tfkit train -c {out}")


@app.command("show")
def show(
    config_file: ConfigFileOpt = None,
    preset: _PresetName = None,
    overrides: SetOpt = None,
) -> None:
    """Print the resolved config (defaults < preset < file < --set) as YAML on stdout.

    Example:

      tfkit config show -c tfkit.yaml --set optim.lr=3e-4
    """
    import sys

    from tfkit import config

    cfg = config.load(config_file, preset, overrides)
    sys.stdout.write(config.to_yaml(cfg))
