"""Split a token file into train and validation files at document (end-of-text) boundaries.

Validation gets whole documents, chosen by a seeded shuffle until it holds at least
``val_fraction`` of the tokens (skipping any document that would push it past
``min(2f, (1+f)/2)`` of the tokens); each output keeps the original document order. With a single
document (or when whole documents cannot give both outputs some tokens) the split falls inside a
document, at the token nearest ``(1 - f)·N`` (after a newline token when a tokenizer is given).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from tfkit.data.tokenfile import TokenFile, TokenFileHeader, write_token_file
from tfkit.data.tokenizer import Tokenizer
from tfkit.errors import DataError

_STEP = 1 << 24


@dataclass(frozen=True)
class SplitResult:
    """What :func:`split_token_file` wrote.

    Attributes:
        train_header, val_header: headers of the two files.
        train_path, val_path: the two files.
        n_val_documents: documents (or the document part) in the validation file.
        inside_document: True when the cut fell inside a document (one document only, or whole
            documents could not give both files tokens); the CLI warns about it.
    """

    train_header: TokenFileHeader
    val_header: TokenFileHeader
    train_path: Path
    val_path: Path
    n_val_documents: int
    inside_document: bool


def default_outputs(path: Union[str, os.PathLike]) -> tuple[Path, Path]:
    """``corpus.bin`` → (``corpus.train.bin``, ``corpus.val.bin``) beside it."""
    path = Path(path)
    stem = path.name[:-4] if path.name.endswith(".bin") else path.name
    return path.with_name(f"{stem}.train.bin"), path.with_name(f"{stem}.val.bin")


def document_ends(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """Exclusive end offset of each document: int64 array, positions after each EOT, plus
    ``len(tokens)`` when the data does not end with EOT."""
    parts = []
    for s in range(0, len(tokens), _STEP):
        parts.append(np.flatnonzero(tokens[s:s + _STEP] == eot_id).astype(np.int64) + (s + 1))
    ends = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(tokens) and (len(ends) == 0 or ends[-1] != len(tokens)):
        ends = np.append(ends, np.int64(len(tokens)))
    return ends


def _inside_cut(tokens: np.ndarray, fraction: float, tokenizer: Optional[Tokenizer]) -> int:
    n = len(tokens)
    target = min(max(int(round((1.0 - fraction) * n)), 1), n - 1)
    if tokenizer is None:
        return target
    newlines = tokenizer.newline_ids()
    if newlines.size == 0:
        return target
    window = max(1, min(n // 20, 1 << 16))
    lo, hi = max(0, target - window), min(n - 1, target + window)
    pos = np.flatnonzero(np.isin(tokens[lo:hi], newlines)) + lo + 1  # cut just after the newline
    pos = pos[(pos >= 1) & (pos <= n - 1)]
    if pos.size == 0:
        return target
    return int(pos[np.argmin(np.abs(pos - target))])


def _choose_documents(lengths: np.ndarray, fraction: float, seed: int) -> Optional[np.ndarray]:
    """Indices of the validation documents, or None when whole documents cannot make a split.

    Documents are taken in the order of ``default_rng(seed).permutation`` until validation holds
    at least ``fraction`` of the tokens; a document that would push validation above
    ``min(2f, (1+f)/2)`` of the tokens is skipped (so one huge document cannot take it all).
    """
    n_docs, total = len(lengths), int(lengths.sum())
    target, cap = fraction * total, min(2 * fraction, (1 + fraction) / 2) * total
    order = np.random.default_rng(seed).permutation(n_docs)
    cum = np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, target, side="left")) + 1  # first prefix with val ≥ f·N
    if k <= n_docs and cum[k - 1] <= cap:
        chosen = order[:k]
    else:  # rare: a big document overshoots; walk the order and skip the ones that do
        picked, val = [], 0
        for i in order:
            if val + lengths[i] <= cap:
                picked.append(i)
                val += int(lengths[i])
                if val >= target:
                    break
        if val < target:
            return None
        chosen = np.array(picked, dtype=np.int64)
    if len(chosen) == 0 or len(chosen) >= n_docs:
        return None
    return chosen


def _runs(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, mask: np.ndarray,
          tf: Optional[TokenFile] = None) -> Iterator:
    """Slices of ``tokens`` for the documents where ``mask`` is True, merging neighbours; with a
    token file ``tf`` that has a loss mask, ``(ids, loss mask)`` pairs, so the mask follows its ids."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return
    breaks = np.flatnonzero(np.diff(idx) != 1)
    first = np.concatenate(([0], breaks + 1))
    last = np.concatenate((breaks, [idx.size - 1]))
    for a, b in zip(idx[first], idx[last]):
        lo, hi = int(starts[a]), int(ends[b])
        for s in range(lo, hi, _STEP):
            e = min(hi, s + _STEP)
            yield tokens[s:e] if tf is None or not tf.has_mask else (tokens[s:e], tf.loss_mask(s, e))


def split_token_file(
    path: Union[str, os.PathLike],
    val_fraction: float = 0.1,
    seed: int = 0,
    train_out: Union[str, os.PathLike, None] = None,
    val_out: Union[str, os.PathLike, None] = None,
    tokenizer: Optional[Tokenizer] = None,
) -> SplitResult:
    """Split a token file into train and validation token files at document boundaries.

    Args:
        path: the token file (e.g. ``corpus.bin``).
        val_fraction: share of tokens for validation, in (0, 1); val gets at least this share,
            rounded up to whole documents.
        seed: seed of the document shuffle (``np.random.default_rng(seed)``).
        train_out, val_out: outputs; default ``<stem>.train.bin`` and ``<stem>.val.bin`` beside
            ``path``.
        tokenizer: optional; when given (it must match the file's tokenizer hash) the outputs get
            exact ``n_bytes`` and an inside-document cut falls just after a newline token.

    Returns:
        A :class:`SplitResult`.

    Raises:
        DataError: fraction not in (0, 1), an invalid token file, fewer than 2 tokens, an output
            equal to the input, or a tokenizer that did not make the file.
    """
    try:
        f = float(val_fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if not (math.isfinite(f) and 0.0 < f < 1.0):
        raise DataError(f"val fraction {val_fraction} is not between 0 and 1 (exclusive)",
                        "pass e.g. `--val-fraction 0.1` for 10% validation tokens")
    path = Path(path)
    tf = TokenFile.open(path)
    h = tf.header
    tokens = tf.tokens
    n = len(tokens)
    if n < 2:
        raise DataError(f"`{path}` has {n} token, too few to split", "prepare more text")
    d_train, d_val = default_outputs(path)
    train_path = Path(train_out) if train_out else d_train
    val_path = Path(val_out) if val_out else d_val
    src = path.resolve()
    if train_path.resolve() == src or val_path.resolve() == src or train_path.resolve() == val_path.resolve():
        raise DataError(f"split outputs `{train_path}` and `{val_path}` must differ from each other and the input",
                        "choose other names with `--train-out` and `--val-out`")
    lengths_table = None
    if tokenizer is not None:
        if tokenizer.hash != h.tokenizer_hash:
            raise DataError(f"the tokenizer (hash {tokenizer.hash[:12]}) did not make `{path}` "
                            f"(hash {h.tokenizer_hash[:12]})", "pass the tokenizer.json used by `tfkit prepare`")
        lengths_table = tokenizer.byte_lengths()

    ends = document_ends(tokens, h.eot_id)
    starts = np.concatenate(([0], ends[:-1])).astype(np.int64)
    n_docs = len(ends)
    inside = True
    if n_docs >= 2:
        chosen = _choose_documents(ends - starts, f, seed)
        if chosen is not None:
            inside = False
            val_mask = np.zeros(n_docs, dtype=bool)
            val_mask[chosen] = True
    if inside:
        cut = _inside_cut(tokens, f, tokenizer)
        one = np.array([True])
        train_chunks = _runs(tokens, np.array([0]), np.array([cut]), one, tf)
        val_chunks = _runs(tokens, np.array([cut]), np.array([n]), one, tf)
    else:
        train_chunks = _runs(tokens, starts, ends, ~val_mask, tf)
        val_chunks = _runs(tokens, starts, ends, val_mask, tf)

    def write(out: Path, chunks: Iterator[np.ndarray]) -> TokenFileHeader:
        total = {"bytes": 0}

        def counted() -> Iterator:
            for c in chunks:
                if lengths_table is not None:
                    ids = c[0] if isinstance(c, tuple) else c
                    total["bytes"] += int(np.take(lengths_table, ids, mode="clip").sum(dtype=np.int64))
                yield c

        return write_token_file(out, counted(), vocab_size=h.vocab_size, tokenizer_hash=h.tokenizer_hash,
                                eot_id=h.eot_id, source_fingerprint=f"split:{h.source_fingerprint}",
                                n_bytes=lambda: total["bytes"])

    train_header = write(train_path, train_chunks)
    val_header = write(val_path, val_chunks)
    return SplitResult(train_header, val_header, train_path, val_path, val_header.n_documents, inside)
