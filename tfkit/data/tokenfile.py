"""The token file: one flat array of token ids behind a small JSON header, read by memmap.

Layout (all integers little-endian)::

    bytes 0-7      magic b"TFKITTOK"
    bytes 8-11     uint32: length L of the UTF-8 JSON header
    bytes 12-12+L  the JSON header (see :class:`TokenFileHeader`)
    ...            zero padding up to HEADER_SIZE = 4096 bytes
    4096-          n_tokens ids, each uint16 (vocab_size <= 65536) or uint32

Every check raises :class:`tfkit.errors.DataError` (exit code 2) naming the file and the problem,
with a hint, instead of a bare ``assert`` (Megatron's ``.idx`` reader asserts, which ``python -O``
strips). Writing is atomic: a temporary file beside the destination, fsynced, then ``os.replace``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np

from tfkit.errors import DataError

MAGIC = b"TFKITTOK"
"""First 8 bytes of every token file."""
HEADER_SIZE = 4096
"""Bytes before the first token (magic + length + JSON + zero padding)."""
FORMAT_VERSION = 1
"""The only ``format_version`` this code reads and writes."""
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
"""Supported on-disk token dtypes (little-endian)."""
UINT16_MAX_VOCAB = 65536
"""Largest vocabulary whose ids all fit in uint16 (ids 0..65535)."""

_PREFIX = struct.Struct("<8sI")
_WRITE_STEP = 1 << 22
_REMAKE = "re-create it with `tfkit prepare FILES… --tokenizer tokenizer.json --out FILE` (or `tfkit dummy-data`)"


def dtype_for_vocab(vocab_size: int) -> str:
    """Name of the smallest supported dtype holding ids ``0..vocab_size-1``: ``"uint16"`` or ``"uint32"``.

    Raises:
        DataError: vocab_size < 1 or > 2**32.
    """
    if vocab_size < 1 or vocab_size > 2**32:
        raise DataError(f"vocab_size {vocab_size} is out of range (1 … 2^32)", "check the tokenizer's vocab size")
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


@dataclass(frozen=True)
class TokenFileHeader:
    """The JSON header of a token file.

    Attributes:
        format_version: layout version (1).
        dtype: ``"uint16"`` when ``vocab_size <= 65536``, else ``"uint32"``.
        n_tokens: number of token ids after the header.
        vocab_size: ids are in ``[0, vocab_size)``.
        tokenizer_hash: :attr:`tfkit.data.tokenizer.Tokenizer.hash` of the tokenizer that made the ids
            (``"none"`` for random dummy data).
        eot_id: id of the end-of-text token that ends every document.
        n_documents: documents in the file (EOT count, plus one when the file does not end with EOT).
        source_fingerprint: sha256 of the source files' names, sizes and mtimes; ``"dummy"``; or
            ``"split:<parent fingerprint>"``.
        n_bytes: UTF-8 bytes of source text these tokens encode (0 = unknown); used for bits per byte.
    """

    format_version: int
    dtype: str
    n_tokens: int
    vocab_size: int
    tokenizer_hash: str
    eot_id: int
    n_documents: int
    source_fingerprint: str
    n_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The header as a JSON-safe dict (the exact keys written to the file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "token file") -> "TokenFileHeader":
        """Build and validate a header from a dict (as read from the file's JSON).

        Raises:
            DataError: a key is missing or has the wrong type, or the version/dtype is unsupported,
                or the dtype cannot hold the vocabulary.
        """
        if not isinstance(data, dict):
            raise DataError(f"`{where}`: header is not a JSON object", f"the file is corrupt; {_REMAKE}")
        kinds = {"format_version": int, "dtype": str, "n_tokens": int, "vocab_size": int, "tokenizer_hash": str,
                 "eot_id": int, "n_documents": int, "source_fingerprint": str, "n_bytes": int}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name == "n_bytes":
                    values[f.name] = 0
                    continue
                raise DataError(f"`{where}`: header has no `{f.name}`", f"the file is corrupt; {_REMAKE}")
            v = data[f.name]
            kind = kinds[f.name]
            if isinstance(v, bool) or not isinstance(v, kind):
                raise DataError(f"`{where}`: header field `{f.name}` = {v!r} is not a {kind.__name__}",
                                f"the file is corrupt; {_REMAKE}")
            values[f.name] = v
        h = cls(**values)
        if h.format_version != FORMAT_VERSION:
            raise DataError(f"`{where}`: unsupported format_version {h.format_version} (this tfkit reads {FORMAT_VERSION})",
                            f"upgrade tfkit, or {_REMAKE}")
        if h.dtype not in DTYPES:
            raise DataError(f"`{where}`: unsupported dtype {h.dtype!r} (expected uint16 or uint32)", _REMAKE)
        if h.vocab_size < 1:
            raise DataError(f"`{where}`: header vocab_size {h.vocab_size} must be positive", _REMAKE)
        if h.dtype == "uint16" and h.vocab_size > UINT16_MAX_VOCAB:
            raise DataError(f"`{where}`: dtype uint16 cannot hold vocab_size {h.vocab_size} (ids above 65535 would wrap)",
                            f"{_REMAKE}; vocabularies above 65,536 are stored as uint32")
        if h.n_tokens < 0 or h.n_documents < 0 or h.n_bytes < 0:
            raise DataError(f"`{where}`: header has a negative count", f"the file is corrupt; {_REMAKE}")
        if not 0 <= h.eot_id < h.vocab_size:
            raise DataError(f"`{where}`: header eot_id {h.eot_id} is outside the vocabulary (vocab_size {h.vocab_size})",
                            _REMAKE)
        return h

    @property
    def itemsize(self) -> int:
        """Bytes per stored token (2 or 4)."""
        return DTYPES[self.dtype].itemsize


def _read_header(path: Path) -> TokenFileHeader:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"token file `{path}` does not exist",
                        "check the path, or make one with `tfkit prepare FILES… --tokenizer tokenizer.json --out FILE`") from None
    if path.is_dir():
        raise DataError(f"`{path}` is a folder, not a token file", "pass the `.bin` file made by `tfkit prepare`")
    if size == 0:
        raise DataError(f"token file `{path}` is empty (0 bytes)", _REMAKE)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < _PREFIX.size or head[:8] != MAGIC:
        raise DataError(f"`{path}` is not a tfkit token file (wrong magic bytes {head[:8]!r}, expected {MAGIC!r})",
                        f"{_REMAKE}; headerless nanoGPT-style .bin files are not accepted")
    _, length = _PREFIX.unpack_from(head)
    if length == 0 or _PREFIX.size + length > HEADER_SIZE:
        raise DataError(f"`{path}`: header length {length} is out of range (1 … {HEADER_SIZE - _PREFIX.size})",
                        f"the file is corrupt; {_REMAKE}")
    if len(head) < HEADER_SIZE:
        raise DataError(f"`{path}` is truncated: {size} bytes, shorter than its {HEADER_SIZE}-byte header",
                        f"the file is incomplete; {_REMAKE}")
    raw = head[_PREFIX.size:_PREFIX.size + length]
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"`{path}`: header JSON is unreadable ({exc})", f"the file is corrupt; {_REMAKE}") from None
    return TokenFileHeader.from_dict(data, where=str(path))


class TokenFile:
    """A validated, memory-mapped token file.

    Use :meth:`open`; do not call the constructor directly.

    Attributes:
        path: the file.
        header: its :class:`TokenFileHeader`.
        tokens: read-only ``np.memmap`` of shape ``(n_tokens,)`` and dtype ``<u2`` or ``<u4``.
    """

    def __init__(self, path: Path, header: TokenFileHeader, tokens: np.ndarray) -> None:
        self.path = path
        self.header = header
        self.tokens = tokens

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "TokenFile":
        """Open and validate a token file.

        Raises:
            DataError: missing or empty file, wrong magic, unreadable header JSON, unsupported version
                or dtype, a file size that is not ``HEADER_SIZE + n_tokens * itemsize`` (truncated,
                trailing bytes or dtype mismatch), or zero tokens.
        """
        path = Path(path)
        h = _read_header(path)
        size = path.stat().st_size
        body = size - HEADER_SIZE
        if body % h.itemsize:
            raise DataError(f"`{path}`: data size {body} bytes is not a multiple of the {h.dtype} item size "
                            f"{h.itemsize} (dtype mismatch or truncated file)", f"the file is corrupt; {_REMAKE}")
        have = body // h.itemsize
        if have < h.n_tokens:
            raise DataError(f"`{path}` is truncated: header says {h.n_tokens} tokens but the file holds {have}",
                            f"the file is incomplete; {_REMAKE}")
        if have > h.n_tokens:
            raise DataError(f"`{path}`: file holds {have} tokens but its header says {h.n_tokens} (trailing bytes)",
                            f"the file is corrupt; {_REMAKE}")
        if h.n_tokens == 0:
            raise DataError(f"token file `{path}` holds zero tokens", f"prepare it from non-empty text; {_REMAKE}")
        tokens = np.memmap(path, dtype=DTYPES[h.dtype], mode="r", offset=HEADER_SIZE, shape=(h.n_tokens,))
        return cls(path, h, tokens)

    def __len__(self) -> int:
        return self.header.n_tokens

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, n_tokens={self.header.n_tokens}, vocab_size={self.header.vocab_size})"

    def check_ids(self, vocab_size: Optional[int] = None, chunk: int = 1 << 24) -> None:
        """Check that every id is below ``vocab_size`` (default: the header's), scanning in chunks.

        Args:
            vocab_size: exclusive upper bound on ids (a model's or tokenizer's vocabulary size).
            chunk: tokens scanned per step (bounds memory to about ``chunk * 8`` bytes).

        Raises:
            DataError: "`path`: token id X ≥ vocab_size V at offset O" for the first offending id.
        """
        v = self.header.vocab_size if vocab_size is None else int(vocab_size)
        find_id_out_of_range(self.tokens, v, where=f"`{self.path}`", chunk=chunk)


_OUT_OF_RANGE_HINT = ("the data was made with a bigger tokenizer than the model expects: use the tokenizer that made it, "
                      "or re-create it with `tfkit prepare … --tokenizer tokenizer.json`")


def find_id_out_of_range(tokens: np.ndarray, vocab_size: int, where: str, chunk: int = 1 << 24, base: int = 0,
                         hint: str = _OUT_OF_RANGE_HINT) -> None:
    """Raise :class:`DataError` at the first id outside ``[0, vocab_size)`` in a 1-D integer array.

    ``base`` is added to the offset reported (for arrays that are pieces of a longer stream).
    """
    n = len(tokens)
    for start in range(0, n, chunk):
        part = tokens[start:start + chunk]
        bad = (part >= vocab_size) if part.dtype.kind == "u" else ((part < 0) | (part >= vocab_size))
        if bad.any():
            i = int(np.argmax(bad))
            tok = int(part[i])
            if tok < 0:
                raise DataError(f"{where}: negative token id {tok} at offset {base + start + i}",
                                "token ids must be in [0, vocab_size); re-create the file with `tfkit prepare`")
            raise DataError(f"{where}: token id {tok} ≥ vocab_size {vocab_size} at offset {base + start + i}", hint)


def count_documents(tokens: np.ndarray, eot_id: int, chunk: int = 1 << 24) -> int:
    """Documents in a token array: EOT count, plus one when it is non-empty and does not end with EOT."""
    n = len(tokens)
    count = 0
    for start in range(0, n, chunk):
        count += int(np.count_nonzero(tokens[start:start + chunk] == eot_id))
    if n and int(tokens[n - 1]) != eot_id:
        count += 1
    return count


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_token_file(
    path: Union[str, os.PathLike],
    chunks: Iterable[np.ndarray],
    vocab_size: int,
    tokenizer_hash: str,
    eot_id: int,
    source_fingerprint: str,
    n_bytes: Union[int, Callable[[], int]] = 0,
    n_documents: Union[int, Callable[[], int], None] = None,
) -> TokenFileHeader:
    """Stream token ids into a new token file, atomically.

    The ids are written to ``<path>.tmp-<pid>`` as they arrive (constant memory), the header is then
    written with the final counts, the file is fsynced and renamed over ``path``. On any exception
    the temporary file is removed and an existing ``path`` is left untouched.

    Args:
        path: destination file.
        chunks: 1-D integer arrays (or lists) of ids, in order.
        vocab_size: ids must be in ``[0, vocab_size)``; picks uint16 (≤ 65,536) or uint32.
        tokenizer_hash: hash of the tokenizer that made the ids (``"none"`` if none did).
        eot_id: end-of-text id.
        source_fingerprint: see :class:`TokenFileHeader`.
        n_bytes: UTF-8 bytes of source text, or a callable evaluated after the last chunk.
        n_documents: document count, a callable evaluated after the last chunk, or ``None`` to count
            EOT ids while writing (plus one if the data does not end with EOT).

    Returns:
        The header written.

    Raises:
        DataError: an id outside ``[0, vocab_size)`` (nothing is written), zero tokens in total, or a
            non-integer chunk.
        OSError: the file cannot be written (e.g. disk full); the temporary file is removed.
    """
    path = Path(path)
    dtype_name = dtype_for_vocab(vocab_size)
    dtype = DTYPES[dtype_name]
    if not 0 <= eot_id < vocab_size:
        raise DataError(f"eot_id {eot_id} is outside the vocabulary (vocab_size {vocab_size})", "check the tokenizer")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    n_tokens = 0
    eots = 0
    last = -1
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)
            for chunk in chunks:
                arr = np.asarray(chunk)
                if arr.size == 0:
                    continue
                if arr.ndim != 1:
                    arr = arr.reshape(-1)
                if arr.dtype.kind not in "iu":
                    raise DataError(f"token ids for `{path}` must be integers, got dtype {arr.dtype}",
                                    "this is a bug in the caller; please report it")
                for s in range(0, arr.size, _WRITE_STEP):  # bounded temporaries for huge chunks
                    part = arr[s:s + _WRITE_STEP]
                    find_id_out_of_range(part, vocab_size, where=f"writing `{path}`", base=n_tokens,
                                         hint="ids must be below the vocab size; nothing was written")
                    f.write(part.astype(dtype, copy=False).tobytes())
                    n_tokens += part.size
                    eots += int(np.count_nonzero(part == eot_id))
                last = int(arr[-1])
            if n_tokens == 0:
                raise DataError(f"no tokens to write to `{path}` (the input text is empty)",
                                "pass files that contain text")
            if n_documents is None:
                docs = eots + (1 if last != eot_id else 0)
            else:
                docs = int(n_documents() if callable(n_documents) else n_documents)
            nb = int(n_bytes() if callable(n_bytes) else n_bytes)
            header = TokenFileHeader(
                format_version=FORMAT_VERSION, dtype=dtype_name, n_tokens=n_tokens, vocab_size=int(vocab_size),
                tokenizer_hash=str(tokenizer_hash), eot_id=int(eot_id), n_documents=docs,
                source_fingerprint=str(source_fingerprint), n_bytes=nb,
            )
            raw = json.dumps(header.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")
            if _PREFIX.size + len(raw) > HEADER_SIZE:
                raise DataError(f"header for `{path}` is too long ({len(raw)} bytes)",
                                "shorten the tokenizer hash or source fingerprint")
            f.seek(0)
            f.write(_PREFIX.pack(MAGIC, len(raw)) + raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not exc.filename and exc.errno:
            raise OSError(exc.errno, f"{exc.strerror or exc} writing", str(path)) from exc
        raise
    _fsync_dir(path.parent)
    return header
