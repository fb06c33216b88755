"""Fixtures for the data tests: a small tokenizer trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[2].parent / "shared/corpora/shakespeare"


@pytest.fixture(scope="session")
def tok():
    """A 512-token byte-level BPE trained on Macbeth (about 0.1 s)."""
    from tfkit.data.tokenizer import Tokenizer

    return Tokenizer.train_files([CORPUS / "macbeth.txt"], 512)
