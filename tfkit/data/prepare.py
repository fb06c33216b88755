"""Text and JSONL files → one token file: batched, streamed encoding with constant memory.

Documents are read by :func:`tfkit.data.sources.iter_documents`, encoded in groups with
:meth:`Tokenizer.encode_batch` (parallel Rust threads), each document followed by the end-of-text
id, and streamed into :func:`tfkit.data.tokenfile.write_token_file`. Nothing is printed.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from tfkit.data.sources import Document, expand_inputs, fingerprint, iter_documents
from tfkit.data.tokenfile import TokenFile, TokenFileHeader, write_token_file
from tfkit.data.tokenizer import Tokenizer
from tfkit.errors import DataError

BATCH_CHARS = 1 << 20
"""Characters of text encoded per ``encode_batch`` call (bounds memory: about 130 MB per batch)."""
BATCH_DOCS = 4096
"""Most texts per ``encode_batch`` call."""
SUB_CHARS = 1 << 16
"""Longer texts are cut (after a newline) into parts of at most this many characters, so a batch
holds several parts that encode in parallel."""


@dataclass
class EncodeStats:
    """Running totals filled in by :func:`encode_documents`.

    Attributes:
        n_tokens: ids produced, end-of-text ids included.
        n_documents: documents finished (end-of-text ids emitted).
        n_bytes: UTF-8 bytes of text the ids stand for (special tokens count 0).
    """

    n_tokens: int = 0
    n_documents: int = 0
    n_bytes: int = 0


def _parts(text: str, size: int) -> list[str]:
    """``text`` cut into parts of at most ``size`` characters, after a newline where there is one."""
    if len(text) <= size:
        return [text]
    out, i, n = [], 0, len(text)
    while i < n:
        if n - i <= size:
            out.append(text[i:])
            break
        j = text.rfind("\n", i, i + size)
        j = j + 1 if j >= i else i + size
        out.append(text[i:j])
        i = j
    return out


def encode_documents(docs: Iterable[Document], tokenizer: Tokenizer, stats: Optional[EncodeStats] = None,
                     batch_chars: int = BATCH_CHARS) -> Iterator[np.ndarray]:
    """Encode documents in batches; yield int64 id arrays with ``eot_id`` after each final piece.

    Long texts are encoded in parts of at most :data:`SUB_CHARS` characters cut after newlines
    (decoding the ids still gives the exact text), so memory stays bounded by ``batch_chars``.

    Args:
        docs: documents or pieces (see :class:`tfkit.data.sources.Document`).
        tokenizer: the tokenizer.
        stats: totals updated as chunks are yielded.
        batch_chars: characters per ``encode_batch`` call.

    Yields:
        1-D ``np.int64`` arrays of ids, in document order.
    """
    stats = stats if stats is not None else EncodeStats()
    lengths = tokenizer.byte_lengths()
    eot = tokenizer.eot_id
    texts: list[str] = []
    ends: list[bool] = []  # an end-of-text id follows texts[i]
    size = 0

    def flush() -> np.ndarray:
        encoded = tokenizer.encode_batch(texts)
        pieces: list[list[int]] = []
        for ids, end in zip(encoded, ends):
            pieces.append(ids)
            if end:
                pieces.append([eot])
                stats.n_documents += 1
        total = sum(len(p) for p in pieces)
        arr = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=total)
        stats.n_tokens += total
        stats.n_bytes += int(lengths[arr].sum(dtype=np.int64)) if total else 0
        return arr

    for doc in docs:
        if not doc.text and not doc.final:
            continue
        parts = _parts(doc.text, SUB_CHARS)
        for k, part in enumerate(parts):
            texts.append(part)
            ends.append(doc.final and k == len(parts) - 1)
            size += len(part)
            if size >= batch_chars or len(texts) >= BATCH_DOCS:
                yield flush()
                texts, ends, size = [], [], 0
    if texts:
        yield flush()


def iter_token_chunks(
    inputs: Sequence[Union[str, os.PathLike]],
    tokenizer: Tokenizer,
    text_field: Optional[str] = None,
    on_progress: Optional[Callable[[int], None]] = None,
    stats: Optional[EncodeStats] = None,
) -> Iterator[np.ndarray]:
    """Expand ``inputs``, read and encode them: the token stream :func:`prepare` writes.

    The ids of all inputs together can be large: to read them as one array, use
    :func:`tokenize_temporary` (memmap) rather than concatenating these chunks.

    Yields:
        1-D ``np.int64`` id arrays; each document is followed by ``tokenizer.eot_id``.

    Raises:
        DataError: any input problem (see :func:`tfkit.data.sources.expand_inputs` and
            :func:`tfkit.data.sources.iter_documents`).
    """
    files = expand_inputs(inputs)
    docs = iter_documents(files, text_field=text_field, on_progress=on_progress)
    yield from encode_documents(docs, tokenizer, stats)


def prepare(
    inputs: Sequence[Union[str, os.PathLike]],
    tokenizer: Tokenizer,
    out: Union[str, os.PathLike],
    text_field: Optional[str] = None,
    on_progress: Optional[Callable[[int], None]] = None,
) -> TokenFileHeader:
    """Tokenize text/JSONL files (or folders, globs) into one token file, streaming.

    Args:
        inputs: files, folders or globs (.txt, .jsonl, .json-lines, .ndjson, optionally .gz).
        tokenizer: the tokenizer; its vocab size, hash and EOT id go into the header.
        out: the token file to write (atomically; an existing file is replaced only on success).
        text_field: JSONL field holding the text.
        on_progress: called with raw source bytes read since the previous call; the calls sum to
            the inputs' total size on disk.

    Returns:
        The header written (``n_tokens``; ``n_documents`` = end-of-text ids, a ``<|endoftext|>`` typed
        in the text included; ``n_bytes`` = UTF-8 bytes of text, …).

    Raises:
        DataError: missing/empty/unsupported inputs, invalid UTF-8, malformed JSONL (see
            :mod:`tfkit.data.sources`), or ``out`` is one of the inputs.
        OSError: the output cannot be written.
    """
    files = expand_inputs(inputs)
    out = Path(out)
    if out.resolve() in {f.resolve() for f in files}:
        raise DataError(f"`{out}` is one of the inputs; writing it would destroy the text",
                        "choose another `--out`, e.g. corpus.bin")
    stats = EncodeStats()
    docs = iter_documents(files, text_field=text_field, on_progress=on_progress)
    return write_token_file(
        out,
        encode_documents(docs, tokenizer, stats),
        vocab_size=tokenizer.vocab_size,
        tokenizer_hash=tokenizer.hash,
        eot_id=tokenizer.eot_id,
        source_fingerprint=fingerprint(files),
        n_bytes=lambda: stats.n_bytes,
    )  # n_documents: counted from the EOT ids, so an "<|endoftext|>" typed in the text counts as one


def tokenize_temporary(
    inputs: Sequence[Union[str, os.PathLike]],
    tokenizer: Tokenizer,
    text_field: Optional[str] = None,
    on_progress: Optional[Callable[[int], None]] = None,
) -> TokenFile:
    """Tokenize text/JSONL files into a temporary token file and memory-map it (e.g. to evaluate on raw text).

    Encoding streams to disk as in :func:`prepare` (constant memory), into a
    ``tempfile.TemporaryDirectory`` that is removed before this returns, and on any error. The
    returned memmap stays readable because an open mapping outlives its unlinked file (POSIX: Linux,
    macOS); the disk space is freed when the mapping is garbage collected. On Windows, where a mapped
    file cannot be deleted, the folder is left in the temporary directory instead.

    Args:
        inputs, tokenizer, text_field, on_progress: as for :func:`prepare`.

    Returns:
        A :class:`TokenFile` whose ``tokens`` hold the ids (each document followed by
        ``tokenizer.eot_id``); its ``path`` no longer exists, so do not call :meth:`TokenFile.fingerprint`.

    Raises:
        DataError: as :func:`prepare` (missing, empty, non-UTF-8 or malformed inputs).
        OSError: the temporary file cannot be written (e.g. no space left in ``$TMPDIR``).
    """
    with tempfile.TemporaryDirectory(prefix="tfkit-tokens-", ignore_cleanup_errors=os.name == "nt") as tmp:
        path = Path(tmp) / "tokens.bin"
        prepare(inputs, tokenizer, path, text_field=text_field, on_progress=on_progress)
        return TokenFile.open(path)
