"""Finding and reading input text: .txt and JSONL files (optionally gzipped), folders and globs.

A ``.txt`` file is one document. It is decoded as UTF-8 (a leading BOM is dropped), CRLF and CR
line ends become LF, and it is read in pieces of about 1 MB cut at a newline, so memory stays
constant on a multi-GB file; the pieces of one file form one document (only the last has
``final=True``). A JSONL file holds one JSON object per line; each is one document.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence, Union

from tfkit.errors import DataError

TEXT_EXTENSIONS = (".txt",)
"""Plain-text suffixes (each may be followed by ``.gz``)."""
JSONL_EXTENSIONS = (".jsonl", ".json-lines", ".ndjson")
"""JSON-lines suffixes (each may be followed by ``.gz``)."""
TEXT_FIELDS = ("text", "content", "message", "body", "output")
"""JSONL fields searched for a document's text, in order, when no ``--text-field`` is given."""
PIECE_CHARS = 1 << 20
"""Target size of one piece of a .txt file, in characters (about 1 MB)."""

_BOM = codecs.BOM_UTF8
_SUPPORTED = ", ".join(TEXT_EXTENSIONS + JSONL_EXTENSIONS) + " (optionally .gz)"


@dataclass(frozen=True)
class Document:
    """A document, or one piece of a long .txt document.

    Attributes:
        text: the text (LF line ends, no BOM).
        source: where it came from: ``path`` for .txt, ``path:line`` for JSONL.
        final: True on the last (or only) piece of a document; an end-of-text token follows it.
        spans: see below.
    """

    text: str
    source: str
    final: bool = True
    spans: Optional[tuple[tuple[int, int], ...]] = None
    """For a conversation: the character spans of its assistant turns (:mod:`tfkit.data.chat`);
    None for plain text (every token counts)."""


def _kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(TEXT_EXTENSIONS):
        return "txt"
    if name.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    return None


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_inputs(paths: Sequence[Union[str, os.PathLike]]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated file list.

    Folders and globs keep only supported files (.txt, .jsonl, .json-lines, .ndjson, each optionally
    .gz); a file named directly must have a supported extension.

    Returns:
        The files, in the order given (each folder or glob sorted by path).

    Raises:
        DataError: no paths, a missing path, a glob or folder without supported files, a file with
            an unsupported extension, or an empty (0-byte) file.
    """
    if not paths:
        raise DataError("no input files given", "pass .txt or .jsonl files, folders or globs, e.g. `data/*.txt`")
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        if p.stat().st_size == 0:
            raise DataError(f"input file `{p}` is empty (0 bytes)", "remove it from the inputs or give it some text")
        out.append(p)

    for item in paths:
        text = os.fspath(item)
        p = Path(text).expanduser()
        if p.is_file():
            if _kind(p) is None:
                raise DataError(f"`{p}` has an unsupported extension `{p.suffix or '(none)'}`",
                                f"tfkit reads {_SUPPORTED}; rename or convert the file")
            add(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) is not None
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"folder `{p}` contains no {_SUPPORTED} files", "point at a folder of text files")
            for f in found:
                add(f)
        elif _is_glob(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            found = [m for m in matches if m.is_file() and _kind(m) is not None]
            if not found:
                what = "matches nothing" if not matches else f"matches no {_SUPPORTED} files"
                raise DataError(f"pattern `{text}` {what}", "check the pattern (quote it so the shell does not expand it)")
            for f in found:
                add(f)
        else:
            raise DataError(f"input `{p}` does not exist", "check the path")
    return out


def fingerprint(files: Iterable[Path]) -> str:
    """sha256 hex of the files' names, sizes and modification times (cheap change detection)."""
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()


class _Source:
    """A raw file opened for binary reading, gunzipped if needed, with raw-byte progress."""

    def __init__(self, path: Path, on_progress: Optional[Callable[[int], None]]) -> None:
        self.raw = open(path, "rb")
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self.raw, mode="rb") if path.name.lower().endswith(".gz") else self.raw  # type: ignore[assignment]
        self.on_progress = on_progress
        self.reported = 0

    def report(self) -> None:
        if self.on_progress is not None:
            pos = self.raw.tell()
            if pos > self.reported:
                self.on_progress(pos - self.reported)
                self.reported = pos

    def close(self) -> None:
        self.report()
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()


def _gzip_errors() -> tuple[type[BaseException], ...]:
    import zlib

    return (gzip.BadGzipFile, EOFError, zlib.error)


def _iter_txt(path: Path, piece_chars: int, on_progress: Optional[Callable[[int], None]]) -> Iterator[Document]:
    src = _Source(path, on_progress)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    fed = 0  # decoded-stream bytes handed to the decoder so far
    carry = ""
    pending_cr = False
    has_text = False
    first = True
    try:
        while True:
            try:
                data = src.stream.read(piece_chars)
            except _gzip_errors() as exc:
                raise DataError(f"`{path}` is not a readable gzip file ({exc})", "re-compress it with `gzip`") from None
            final = not data
            if first:
                first = False
                if data.startswith(_BOM):
                    data = data[len(_BOM):]
                    fed += len(_BOM)
            start = fed - len(decoder.getstate()[0])  # byte offset of the text decoded below
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as exc:
                raise DataError(f"`{path}` is not valid UTF-8 (byte offset {start + exc.start}: {exc.reason})",
                                "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`") from None
            fed += len(data)
            nul = text.find("\0")
            if nul >= 0:
                offset = start + len(text[:nul].encode("utf-8"))
                raise DataError(f"`{path}` contains a NUL byte at byte offset {offset} (binary file or UTF-16?)",
                                "pass UTF-8 text files only; convert UTF-16 with `iconv -f utf-16 -t utf-8 IN > OUT`")
            if pending_cr:
                text = "\r" + text
                pending_cr = False
            if not final and text.endswith("\r"):
                text = text[:-1]
                pending_cr = True
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if not has_text and text and not text.isspace():
                has_text = True
            carry += text
            src.report()
            if final:
                break
            if len(carry) >= piece_chars:
                cut = carry.rfind("\n")
                if cut < 0 and len(carry) >= 4 * piece_chars:  # a giant line: cut at a space, else anywhere
                    cut = carry.rfind(" ")
                    if cut < 0:
                        cut = len(carry) - 1
                if cut >= 0:
                    yield Document(carry[:cut + 1], str(path), final=False)
                    carry = carry[cut + 1:]
        if not has_text:
            raise DataError(f"input file `{path}` contains only whitespace", "remove it from the inputs or give it some text")
        yield Document(carry, str(path), final=True)
    finally:
        src.close()


Renderer = Callable[[Any], Any]
"""Turns a ``messages`` list into text and assistant spans (:func:`tfkit.data.chat.render`)."""


def _messages_text(value: Any, where: str, render: Optional[Renderer] = None) -> tuple[str, Optional[tuple]]:
    from tfkit.data.chat import render_tfkit

    if isinstance(value, list):  # line ends normalised before rendering, so the spans stay exact
        value = [{**m, "content": m["content"].replace("\r\n", "\n").replace("\r", "\n")}
                 if isinstance(m, dict) and isinstance(m.get("content"), str) else m for m in value]
    try:
        r = (render or render_tfkit)(value)
    except DataError as exc:
        raise DataError(f"{where}: {exc.message}", exc.hint) from None
    return r.text, r.spans


def _extract_text(obj: dict[str, Any], text_field: Optional[str], where: str,
                  render: Optional[Renderer] = None) -> tuple[str, Optional[tuple]]:
    if text_field:
        if text_field not in obj:
            keys = ", ".join(f"`{k}`" for k in list(obj)[:12]) or "none"
            raise DataError(f"{where}: no field `{text_field}` (fields: {keys})", "pick one of those with `--text-field`")
        value = obj[text_field]
        if isinstance(value, str):
            return value, None
        if isinstance(value, list):
            return _messages_text(value, f"{where}: `{text_field}`", render)
        raise DataError(f"{where}: field `{text_field}` is {type(value).__name__}, not text",
                        "choose a text field with `--text-field`")
    for key in TEXT_FIELDS:
        if isinstance(obj.get(key), str):
            return obj[key], None
    if isinstance(obj.get("messages"), list):
        return _messages_text(obj["messages"], f"{where}: `messages`", render)
    keys = ", ".join(f"`{k}`" for k in list(obj)[:12]) or "none"
    raise DataError(f"{where}: no text field ({', '.join(TEXT_FIELDS)} or messages) among {keys}",
                    "name the field that holds the text with `--text-field FIELD`")


def _iter_jsonl(path: Path, text_field: Optional[str], on_progress: Optional[Callable[[int], None]],
                render: Optional[Renderer] = None, on_skip: Optional[Callable[[str], None]] = None) -> Iterator[Document]:
    src = _Source(path, on_progress)
    n_docs = 0
    try:
        lineno = 0
        while True:
            try:
                raw = src.stream.readline()
            except _gzip_errors() as exc:
                raise DataError(f"`{path}` is not a readable gzip file ({exc})", "re-compress it with `gzip`") from None
            if not raw:
                break
            lineno += 1
            where = f"`{path}:{lineno}`"
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (byte {exc.start} of the line: {exc.reason})",
                                "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})",
                                "each line of a .jsonl file must be one JSON object, e.g. {\"text\": \"…\"}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}",
                                "each line of a .jsonl file must be one JSON object, e.g. {\"text\": \"…\"}")
            try:
                text, spans = _extract_text(obj, text_field, where, render)
            except DataError as exc:
                if on_skip is None or "messages" not in obj and not isinstance(obj.get(text_field or ""), list):
                    raise
                on_skip(exc.message)  # a bad conversation: skipped and counted, unless --strict
                continue
            if "\r" in text and spans is None:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if lineno % 1024 == 0:
                src.report()
            if not text:
                continue
            n_docs += 1
            yield Document(text, f"{path}:{lineno}", final=True, spans=spans)
        if n_docs == 0:
            raise DataError(f"`{path}` holds no documents with text", "check the file (one JSON object per line)")
    finally:
        src.close()


def iter_documents(
    files: Iterable[Union[str, os.PathLike]],
    text_field: Optional[str] = None,
    on_progress: Optional[Callable[[int], None]] = None,
    piece_chars: Optional[int] = None,
    render: Optional[Renderer] = None,
    on_skip: Optional[Callable[[str], None]] = None,
) -> Iterator[Document]:
    """Read documents from files (as returned by :func:`expand_inputs`), streaming.

    A .txt file yields one document, in pieces of about ``piece_chars`` characters cut after a
    newline (``final`` only on the last). A JSONL line yields one document: the text in
    ``text_field``, or else the first string among ``text, content, message, body, output``, or else
    a ``messages`` list rendered by ``render`` (tfkit's format by default). Blank lines and
    empty texts are skipped.

    Args:
        files: input files.
        text_field: JSONL field holding the text (a string, or a list of chat messages).
        on_progress: called with the number of raw (on-disk, compressed for .gz) bytes read since
            the previous call; the calls sum to the files' total size.
        piece_chars: piece size for .txt files, in characters (default :data:`PIECE_CHARS`).
        render: how a ``messages`` list becomes text and assistant spans (default: tfkit's format,
            :func:`tfkit.data.chat.render_tfkit`); the spans travel in :attr:`Document.spans`.
        on_skip: called with the reason (naming ``file:line``) for each invalid ``messages`` record,
            which is then skipped; without it such a record raises.

    Raises:
        DataError: invalid UTF-8 (naming the file and byte offset), a NUL byte, a whitespace-only
            .txt file, malformed JSON or a missing text field (naming ``file:line``), a JSONL file
            without documents, a corrupt gzip file, or an unsupported extension.
    """
    piece = int(piece_chars or PIECE_CHARS)
    for f in files:
        path = Path(f)
        kind = _kind(path)
        if kind == "txt":
            yield from _iter_txt(path, piece, on_progress)
        elif kind == "jsonl":
            yield from _iter_jsonl(path, text_field, on_progress, render, on_skip)
        else:
            raise DataError(f"`{path}` has an unsupported extension", f"tfkit reads {_SUPPORTED}")
