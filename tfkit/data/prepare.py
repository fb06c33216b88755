"""Text and JSONL files → one token file: batched, streamed encoding with constant memory.

Documents are read by :func:`tfkit.data.sources.iter_documents`, encoded in groups with
:meth:`Tokenizer.encode_batch` (parallel Rust threads), each document followed by the end-of-text
id, and streamed into :func:`tfkit.data.tokenfile.write_token_file`. Nothing is printed.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass, field
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
        n_conversations: ``messages`` records among the documents.
        n_loss_tokens: tokens the loss mask counts (assistant turns; every token of plain text).
        n_without_assistant: conversations with no assistant turn (they train nothing with
            ``data.loss_on=assistant``).
        n_skipped, skipped: invalid conversations left out, and the first reasons (``file:line: why``).
    """

    n_tokens: int = 0
    n_documents: int = 0
    n_bytes: int = 0
    n_conversations: int = 0
    n_loss_tokens: int = 0
    n_without_assistant: int = 0
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)


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


def span_mask(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Which tokens lie in ``spans``: a token counts when its first character does.

    Shapes:
        offsets: n (start, end) character offsets; spans: sorted, disjoint [start, end) -> (n,) bool.
    """
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    if not spans:
        return np.zeros(len(offsets), dtype=bool)
    a = np.array([s for s, _ in spans], dtype=np.int64)
    b = np.array([e for _, e in spans], dtype=np.int64)
    k = np.searchsorted(a, starts, side="right") - 1  # the last span starting at or before each token
    return (k >= 0) & (starts < b[np.maximum(k, 0)])


def encode_documents(docs: Iterable[Document], tokenizer: Tokenizer, stats: Optional[EncodeStats] = None,
                     batch_chars: int = BATCH_CHARS, masks: bool = False, max_conversation: Optional[int] = None,
                     on_skip: Optional[Callable[[str], None]] = None,
                     require_assistant: bool = False) -> Iterator[np.ndarray]:
    """Encode documents in batches; yield int64 id arrays with ``eot_id`` after each final piece.

    Long texts are encoded in parts of at most :data:`SUB_CHARS` characters cut after newlines
    (decoding the ids still gives the exact text), so memory stays bounded by ``batch_chars``.

    Args:
        docs: documents or pieces (see :class:`tfkit.data.sources.Document`).
        tokenizer: the tokenizer.
        stats: totals updated as chunks are yielded.
        batch_chars: characters per ``encode_batch`` call.

    With ``masks`` it yields ``(ids, mask)`` pairs instead: for a conversation (a document with
    :attr:`~tfkit.data.sources.Document.spans`) the mask marks the tokens of its assistant turns
    (the end-of-text id after it is not marked); every token of plain text is marked.

    A conversation of more than ``max_conversation`` tokens (its end-of-text included), or with
    ``require_assistant`` one without an assistant turn (it would train nothing), is left out:
    reported to ``on_skip`` with its ``file:line``, or refused without ``on_skip``.

    Yields:
        1-D ``np.int64`` arrays of ids, in document order (or ``(ids, bool mask)`` pairs).

    Raises:
        DataError: a conversation longer than ``max_conversation`` and no ``on_skip``.
    """
    stats = stats if stats is not None else EncodeStats()
    lengths = tokenizer.byte_lengths()
    eot = tokenizer.eot_id
    texts: list[str] = []
    ends: list[bool] = []  # an end-of-text id follows texts[i]
    spans: list[Optional[tuple]] = []  # assistant spans of texts[i] (conversations)
    sources: list[str] = []
    size = 0

    def flush():
        encoded = tokenizer.encode_with_offsets(texts) if masks else [(e, None) for e in tokenizer.encode_batch(texts)]
        pieces: list[list[int]] = []
        marks: list[np.ndarray] = []
        for (ids, offsets), end, sp, src in zip(encoded, ends, spans, sources):
            why = hint = None
            if sp is not None and max_conversation is not None and len(ids) + 1 > max_conversation:
                why = (f"`{src}`: a conversation of {len(ids) + 1} tokens is longer than the context "
                       f"({max_conversation} tokens)")
                hint = "shorten it, or prepare with a larger `--context-length`"
            elif sp is not None and require_assistant and not sp:
                why = f"`{src}`: a conversation without an assistant turn trains nothing with data.loss_on=assistant"
                hint = "add the assistant's answer, or keep such records with `--loss-on all`"
            if why is not None:
                if on_skip is None:
                    raise DataError(why, hint)
                on_skip(why)
                continue
            pieces.append(ids)
            if masks:
                marks.append(np.ones(len(ids), dtype=bool) if sp is None else span_mask(offsets, sp))
                if sp is not None:
                    stats.n_conversations += 1
                    stats.n_without_assistant += not sp
            if end:
                pieces.append([eot])
                marks.append(np.array([sp is None]))  # a conversation's end-of-text is not trained
                stats.n_documents += 1
        total = sum(len(p) for p in pieces)
        arr = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=total)
        stats.n_tokens += total
        stats.n_bytes += int(lengths[arr].sum(dtype=np.int64)) if total else 0
        if not masks:
            return arr
        mask = np.concatenate(marks) if marks else np.zeros(0, dtype=bool)
        stats.n_loss_tokens += int(mask.sum())
        return arr, mask

    for doc in docs:
        if not doc.text and not doc.final:
            continue
        parts = [doc.text] if doc.spans is not None else _parts(doc.text, SUB_CHARS)  # spans index the whole text
        for k, part in enumerate(parts):
            texts.append(part)
            ends.append(doc.final and k == len(parts) - 1)
            spans.append(doc.spans)
            sources.append(doc.source)
            size += len(part)
            if size >= batch_chars or len(texts) >= BATCH_DOCS:
                yield flush()
                texts, ends, spans, sources, size = [], [], [], [], 0
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
    stats: Optional[EncodeStats] = None,
    strict: bool = False,
    context_length: Optional[int] = None,
    loss_on: str = "assistant",
) -> TokenFileHeader:
    """Tokenize text/JSONL files (or folders, globs) into one token file, streaming.

    ``messages`` records are rendered with the tokenizer's own chat template when it has one (an
    imported model), else in tfkit's format; when there are any, the file gets a loss mask marking
    their assistant turns (format version 2; :mod:`tfkit.data.chat`). An invalid conversation is
    skipped and counted in ``stats`` (``strict``: refused).

    Args:
        inputs: files, folders or globs (.txt, .jsonl, .json-lines, .ndjson, optionally .gz).
        tokenizer: the tokenizer; its vocab size, hash and EOT id go into the header.
        out: the token file to write (atomically; an existing file is replaced only on success).
        text_field: JSONL field holding the text.
        on_progress: called with raw source bytes read since the previous call; the calls sum to
            the inputs' total size on disk.
        stats: filled with the counts (conversations, loss tokens, skipped records...).
        strict: refuse an invalid conversation instead of skipping it.
        context_length: conversations longer than this many tokens are skipped (``strict``: refused).
        loss_on: ``"assistant"`` (default): a conversation without an assistant turn is skipped too
            (``strict``: refused); ``"all"`` keeps it.

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
    from tfkit.data.chat import render

    stats = stats if stats is not None else EncodeStats()

    def skip(reason: str) -> None:
        stats.n_skipped += 1
        if len(stats.skipped) < 5:
            stats.skipped.append(reason)

    docs = iter_documents(files, text_field=text_field, on_progress=on_progress,
                          render=lambda messages: render(messages, tokenizer), on_skip=None if strict else skip)
    try:
        return _write(out, files, tokenizer, stats, docs, context_length, None if strict else skip,
                      loss_on == "assistant")
    except DataError as exc:
        if stats.n_skipped and exc.message.startswith("no tokens to write"):
            raise DataError(f"every conversation was skipped ({stats.n_skipped}); the first: {stats.skipped[0]}",
                            "fix the records, or raise `--context-length`") from None
        raise


def _write(out, files, tokenizer, stats, docs, context_length, skip, require_assistant) -> TokenFileHeader:
    return write_token_file(
        out,
        encode_documents(docs, tokenizer, stats, masks=True, max_conversation=context_length, on_skip=skip,
                         require_assistant=require_assistant),
        vocab_size=tokenizer.vocab_size,
        tokenizer_hash=tokenizer.hash,
        eot_id=tokenizer.eot_id,
        source_fingerprint=fingerprint(files),
        n_bytes=lambda: stats.n_bytes,
        keep_mask=lambda: stats.n_conversations > 0,  # plain text only: a version-1 file, as before
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
