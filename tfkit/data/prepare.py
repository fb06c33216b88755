"""Text and JSONL files → one token file: batched, streamed encoding with constant memory.

Documents are read by :func:`tfkit.data.sources.iter_documents`, encoded in groups with
:meth:`Tokenizer.encode_batch` (parallel Rust threads), each document followed by the end-of-text
id, and streamed into :func:`tfkit.data.tokenfile.write_token_file`. Nothing is printed.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from tfkit.data.sources import Document, expand_inputs, fingerprint, iter_documents
from tfkit.data.tokenfile import TokenFileHeader, write_token_file
from tfkit.data.tokenizer import Tokenizer

BATCH_CHARS = 4 << 20
"""Characters of text encoded per ``encode_batch`` call (bounds memory)."""
BATCH_DOCS = 4096
"""Most documents per ``encode_batch`` call."""


@dataclass
class EncodeStats:
    """Running totals filled in by :func:`iter_token_chunks`.

    Attributes:
        n_tokens: ids produced, end-of-text ids included.
        n_documents: documents finished (end-of-text ids emitted).
        n_bytes: UTF-8 bytes of text the ids stand for (special tokens count 0).
    """

    n_tokens: int = 0
    n_documents: int = 0
    n_bytes: int = 0


def encode_documents(docs: Iterable[Document], tokenizer: Tokenizer, stats: Optional[EncodeStats] = None,
                     batch_chars: int = BATCH_CHARS) -> Iterator[np.ndarray]:
    """Encode documents in batches; yield int64 id arrays with ``eot_id`` after each final piece.

    Args:
        docs: documents or pieces (see :class:`tfkit.data.sources.Document`).
        tokenizer: the tokenizer.
        stats: totals updated as chunks are yielded.
        batch_chars: characters per batch.

    Yields:
        1-D ``np.int64`` arrays of ids, in document order.
    """
    stats = stats if stats is not None else EncodeStats()
    lengths = tokenizer.byte_lengths()
    eot = tokenizer.eot_id
    batch: list[Document] = []
    size = 0

    def flush() -> np.ndarray:
        encoded = tokenizer.encode_batch([d.text for d in batch])
        pieces: list[list[int]] = []
        for doc, ids in zip(batch, encoded):
            pieces.append(ids)
            if doc.final:
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
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_chars or len(batch) >= BATCH_DOCS:
            yield flush()
            batch, size = [], 0
    if batch:
        yield flush()


def iter_token_chunks(
    inputs: Sequence[Union[str, os.PathLike]],
    tokenizer: Tokenizer,
    text_field: Optional[str] = None,
    on_progress: Optional[Callable[[int], None]] = None,
    stats: Optional[EncodeStats] = None,
) -> Iterator[np.ndarray]:
    """Expand ``inputs``, read and encode them: the token stream :func:`prepare` writes.

    Useful to encode raw text without writing a file (e.g. evaluation on a .txt file).

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
        The header written (``n_tokens``, ``n_documents``, ``n_bytes`` = UTF-8 bytes of text, …).

    Raises:
        DataError: missing/empty/unsupported inputs, invalid UTF-8, malformed JSONL (see
            :mod:`tfkit.data.sources`).
        OSError: the output cannot be written.
    """
    files = expand_inputs(inputs)
    out = Path(out)
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
        n_documents=lambda: stats.n_documents,
    )
