"""Fixtures shared by every test: a private TFKIT_HOME, and a Shakespeare play from ``shared/``."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1].parent / "shared/corpora/shakespeare"
"""The 42 plays and poems; CI clones the repo with ``shared/`` beside it."""


@pytest.fixture(autouse=True)
def tfkit_home(tmp_path_factory, monkeypatch) -> Path:
    """Point ``TFKIT_HOME`` (runs, cache) at a fresh temporary folder for every test."""
    home = tmp_path_factory.mktemp("tfkit_home")
    monkeypatch.setenv("TFKIT_HOME", str(home))
    return home


@pytest.fixture
def play() -> Path:
    """``macbeth.txt`` (about 100 KB of plain ASCII text)."""
    path = CORPUS / "macbeth.txt"
    assert path.is_file(), f"missing {path}: clone the repo with shared/ beside it"
    return path
