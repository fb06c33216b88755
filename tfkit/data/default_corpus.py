"""The bundled default corpus (Shakespeare's 42 works, public domain), tokenized and split on demand.

``tfkit train`` without data arguments calls :func:`ensure_default_data`: the first call trains a
BPE tokenizer on ``tfkit/assets/shakespeare.jsonl.gz``, encodes it and splits it so that
validation is whole works; later calls find the files in the cache and return at once. The cache
folder's name hashes the corpus bytes and the arguments, so changing either builds a new one.
Every file is written atomically and checked on reuse, so an interrupted first run never leaves a
half-written cache behind.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tfkit import paths
from tfkit.errors import DataError

CACHE_VERSION = 1
"""Bump to invalidate every cached default dataset (e.g. after a format change)."""


@dataclass(frozen=True)
class DefaultData:
    """Paths of the cached default dataset.

    Attributes:
        train: training token file (≈ (1 - val_fraction) of the tokens, whole works).
        val: validation token file (whole works).
        tokenizer: the ``tokenizer.json`` that made both.
    """

    train: Path
    val: Path
    tokenizer: Path


def cache_key(corpus: Path, vocab_size: int, val_fraction: float, seed: int) -> str:
    """16 hex digits of sha256 over the corpus bytes and the arguments."""
    h = hashlib.sha256()
    with open(corpus, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"\0v{CACHE_VERSION}\0{int(vocab_size)}\0{float(val_fraction)!r}\0{int(seed)}".encode())
    return h.hexdigest()[:16]


def _usable(path: Path, tokenizer_hash: str, split: bool) -> bool:
    from tfkit.data.tokenfile import TokenFile

    if not path.is_file():
        return False
    try:
        h = TokenFile.open(path).header
    except DataError:
        return False
    return h.tokenizer_hash == tokenizer_hash and (h.source_fingerprint.startswith("split:") == split)


def ensure_default_data(
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_status: Optional[Callable[[str], None]] = None,
    on_progress: Optional[Callable[[int], None]] = None,
) -> DefaultData:
    """Return the bundled corpus as cached train/val token files and tokenizer, building what is missing.

    Files live in ``tfkit.paths.cache_dir()/default/<key>/`` (``tokenizer.json``, ``corpus.bin``,
    ``corpus.train.bin``, ``corpus.val.bin``).

    Args:
        vocab_size: tokenizer vocabulary size.
        val_fraction: share of tokens for validation, in (0, 1), rounded up to whole works.
        seed: seed of the work shuffle that picks the validation works.
        on_status: called with a short line before each slow step (nothing is called on a cache hit).
        on_progress: called with corpus bytes read since the previous call while encoding (the
            calls sum to the size of the .jsonl.gz).

    Raises:
        DataError: the bundled corpus is missing, or the arguments are out of range.
    """
    from tfkit.data.prepare import prepare
    from tfkit.data.split import split_token_file
    from tfkit.data.tokenizer import Tokenizer

    status = on_status or (lambda _msg: None)
    corpus = paths.default_corpus()
    if not corpus.is_file():
        raise DataError(f"the bundled corpus `{corpus}` is missing", "reinstall tfkit, or pass your own `--train-data`")
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val fraction {val_fraction} is not between 0 and 1 (exclusive)", "use e.g. 0.1")
    folder = paths.cache_dir() / "default" / cache_key(corpus, vocab_size, val_fraction, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tok_path = folder / "tokenizer.json"
    bin_path = folder / "corpus.bin"
    train_path = folder / "corpus.train.bin"
    val_path = folder / "corpus.val.bin"
    result = DefaultData(train=train_path, val=val_path, tokenizer=tok_path)

    tok: Optional[Tokenizer] = None
    if tok_path.is_file():
        try:
            tok = Tokenizer.load(tok_path)
        except DataError:
            tok = None
    if tok is None:
        status(f"training a {vocab_size}-token BPE tokenizer on the bundled Shakespeare (first run only)")
        tok = Tokenizer.train([corpus], vocab_size, text_field="text")
        tok.save(tok_path)
    if _usable(train_path, tok.hash, split=True) and _usable(val_path, tok.hash, split=True):
        return result
    if not _usable(bin_path, tok.hash, split=False):
        status("encoding the bundled Shakespeare into tokens (first run only)")
        prepare([corpus], tok, bin_path, text_field="text", on_progress=on_progress)
    status(f"splitting: {val_fraction:.0%} of the tokens, whole works, for validation")
    split_token_file(bin_path, val_fraction=val_fraction, seed=seed, train_out=train_path, val_out=val_path,
                     tokenizer=tok)
    return result
