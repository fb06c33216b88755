"""`tfkit list-models`: the runs in the data dir."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer

from tfkit.cli.options import JsonOpt
from tfkit.cli.output import err, human_bytes, human_count, info, print_json


def _size(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def list_runs() -> list[dict]:
    """One dict per run folder: name, arch, params, step, best_val_loss, size_bytes, path, modified, status."""
    from tfkit.paths import runs_dir
    from tfkit.train.runs import read_run_info, shown_status

    rows = []
    root = runs_dir()
    if not root.is_dir():
        return rows
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        meta = read_run_info(d)
        if not meta:
            continue
        mtime = max((p.stat().st_mtime for p in d.iterdir()), default=d.stat().st_mtime)
        rows.append({"name": d.name, "arch": meta.get("arch"), "params": meta.get("params"),
                     "step": meta.get("step", 0), "best_val_loss": meta.get("best_val_loss"),
                     "val_bits_per_byte": meta.get("val_bits_per_byte"), "status": shown_status(d, meta),
                     "size_bytes": _size(d), "path": str(d),
                     "modified": time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))})
    rows.sort(key=lambda r: r["modified"], reverse=True)
    return rows


def _list_archs(json_out: bool) -> None:
    from rich.table import Table

    from tfkit.config import ARCH_HELP, VARIANT_SECTIONS

    rows = [{"arch": a, "description": d, "section": f"model.{a}" if a in VARIANT_SECTIONS else None,
             "settings": list(VARIANT_SECTIONS[a].model_fields) if a in VARIANT_SECTIONS else []}
            for a, d in ARCH_HELP.items()]
    if json_out:
        print_json(rows)
        return
    table = Table(title="model architectures (model.arch)", title_justify="left")
    for col in ("arch", "what it is", "settings"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["arch"], r["description"], f"{r['section']}: " + ", ".join(r["settings"]) if r["settings"] else "-")
    err.print(table)
    info("choose one with `--set model.arch=ARCH`, e.g. `tfkit config init --preset nano --set model.arch=mod`")


def command(json_out: JsonOpt = False,
            archs: Annotated[bool, typer.Option("--archs", help="List the model architectures instead of the runs.")] = False) -> None:
    """List the training runs in the data dir (newest first), or the model architectures.

    Shows name, architecture, parameters, step, best validation loss, size on disk and last
    modified time. `TFKIT_HOME` chooses another data dir. `--archs` lists the values of
    `model.arch` with their settings instead.

    Examples:

      tfkit list-models

      tfkit list-models --json

      tfkit list-models --archs
    """
    if archs:
        _list_archs(json_out)
        return
    from rich.table import Table

    from tfkit.paths import runs_dir

    rows = list_runs()
    if json_out:
        print_json(rows)
        return
    if not rows:
        info(f"no runs in {runs_dir()}")
        info("hint: train one with `tfkit train --preset auto`")
        return
    table = Table(title=f"runs in {runs_dir()}", title_justify="left")
    for col, just in (("name", "left"), ("arch", "left"), ("params", "right"), ("step", "right"),
                      ("best val loss", "right"), ("size", "right"), ("modified", "left"), ("status", "left")):
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r["name"], r["arch"] or "?", human_count(r["params"] or 0), f"{r['step']:,}",
                      f"{r['best_val_loss']:.4f}" if r["best_val_loss"] is not None else "-",
                      human_bytes(r["size_bytes"]), r["modified"], r["status"] or "-")
    err.print(table)
