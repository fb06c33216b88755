"""Where tfkit keeps its data: runs, cached tokenizers and prepared corpora.

The data dir comes from platformdirs (``~/.local/share/tfkit`` on Linux); ``TFKIT_HOME``
overrides it and the cache dir (``$TFKIT_HOME/cache``), which keeps tests hermetic.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Root of tfkit's data (runs live in ``data_dir()/runs``)."""
    home = os.environ.get("TFKIT_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("tfkit", appauthor=False))


def cache_dir() -> Path:
    """Cache for derived files (default-corpus tokenizer and token files); safe to delete."""
    home = os.environ.get("TFKIT_HOME")
    if home:
        return Path(home).expanduser() / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("tfkit", appauthor=False))


def runs_dir() -> Path:
    """Folder holding one sub-folder per training run."""
    return data_dir() / "runs"


def package_dir() -> Path:
    """The installed ``tfkit`` package folder."""
    return Path(__file__).resolve().parent


def presets_dir() -> Path:
    """Preset YAML files: inside the wheel (``tfkit/presets``) or the source tree's ``presets/``."""
    inside = package_dir() / "presets"
    if inside.is_dir():
        return inside
    return package_dir().parent / "presets"


def default_corpus() -> Path:
    """The bundled default corpus: Shakespeare's complete works, gzipped JSONL (one work a line)."""
    return package_dir() / "assets" / "shakespeare.jsonl.gz"
