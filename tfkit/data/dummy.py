"""Random token files in the real format, for smoke tests and benchmarks."""

from __future__ import annotations

import os
from typing import Iterator, Union

import numpy as np

from tfkit.data.tokenfile import TokenFileHeader, write_token_file
from tfkit.errors import DataError

_CHUNK = 1 << 20


def make_dummy(out: Union[str, os.PathLike], n_tokens: int, vocab_size: int, seed: int = 0) -> TokenFileHeader:
    """Write ``n_tokens`` ids drawn uniformly from ``[0, vocab_size)`` to a token file.

    The ids come from ``np.random.default_rng(seed)`` in fixed 2^20-token chunks, so the same
    arguments give the same file. Header: ``tokenizer_hash="none"``, ``eot_id=0``,
    ``source_fingerprint="dummy"``, ``n_bytes=0``.

    Raises:
        DataError: ``n_tokens < 1`` or ``vocab_size < 2`` (or above 2^32).
    """
    n_tokens, vocab_size = int(n_tokens), int(vocab_size)
    if n_tokens < 1:
        raise DataError(f"--tokens {n_tokens} must be at least 1", "pass e.g. `--tokens 100000`")
    if not 2 <= vocab_size <= 2**32:
        raise DataError(f"--vocab-size {vocab_size} is out of range (2 … 2^32)", "pass e.g. `--vocab-size 4096`")
    rng = np.random.default_rng(seed)

    def chunks() -> Iterator[np.ndarray]:
        left = n_tokens
        while left > 0:
            k = min(left, _CHUNK)
            yield rng.integers(0, vocab_size, size=k, dtype=np.uint64 if vocab_size > 2**31 else np.int64)
            left -= k

    return write_token_file(out, chunks(), vocab_size=vocab_size, tokenizer_hash="none", eot_id=0,
                            source_fingerprint="dummy", n_bytes=0)
