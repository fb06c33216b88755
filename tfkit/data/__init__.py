"""Data pipeline: tokenizer, text sources, token files, prepare/split/dummy, batch loaders.

Submodules are imported on first use (``from tfkit.data import TokenFile`` works), so importing
``tfkit.data`` costs nothing; none of them imports torch at module level.

- :mod:`tfkit.data.tokenfile`: the memmap token file format (header, validation, atomic writer).
- :mod:`tfkit.data.tokenizer`: byte-level BPE with end-of-text and chat-role tokens.
- :mod:`tfkit.data.sources`: input discovery (files, folders, globs) and streaming document reading.
- :mod:`tfkit.data.prepare`: text → token file; :mod:`tfkit.data.split`: train/val split.
- :mod:`tfkit.data.dummy`: random token files; :mod:`tfkit.data.loader`: training/eval batches.
- :mod:`tfkit.data.default_corpus`: the bundled Shakespeare, tokenized and cached.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HEADER_SIZE": "tokenfile", "TokenFile": "tokenfile", "TokenFileHeader": "tokenfile",
    "write_token_file": "tokenfile",
    "SPECIAL_TOKENS": "tokenizer", "Tokenizer": "tokenizer", "render_conversation": "tokenizer",
    "Document": "sources", "expand_inputs": "sources", "iter_documents": "sources",
    "prepare": "prepare", "iter_token_chunks": "prepare",
    "SplitResult": "split", "split_token_file": "split",
    "make_dummy": "dummy",
    "BatchLoader": "loader", "eval_batches": "loader", "hold_out": "loader",
    "DefaultData": "default_corpus", "ensure_default_data": "default_corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tfkit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tfkit.data.{module}"), name)
    globals()[name] = value
    return value
