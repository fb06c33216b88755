"""Fixtures of the Hugging Face import/export tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hftiny import save_hf_model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """One saved model folder per family."""
    root = tmp_path_factory.mktemp("hf_models")
    return {f: save_hf_model(f, root / f) for f in ("llama", "llama3", "qwen2", "qwen3", "mistral")}
