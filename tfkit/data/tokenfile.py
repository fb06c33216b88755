"""The token file: one flat array of token ids behind a small JSON header, read by memmap.

Layout (all integers little-endian)::

    bytes 0-7      magic b"TFKITTOK"
    bytes 8-11     uint32: length L of the UTF-8 JSON header
    bytes 12-12+L  the JSON header (see :class:`TokenFileHeader`)
    ...            zero padding up to HEADER_SIZE = 4096 bytes (checked: every byte must be 0)
    4096-          n_tokens ids, each uint16 (vocab_size <= 65536) or uint32
    then           format_version 2 only: the loss mask, ceil(n_tokens / 8) bytes, bit i (little
                   bit order: token 8j+k is bit k of byte j) set when token i is one the loss counts
                   (an assistant turn of a conversation); version 1 files have no mask

Every check raises :class:`tfkit.errors.DataError` (exit code 2) naming the file and the problem,
with a hint, instead of a bare ``assert`` (Megatron's ``.idx`` reader asserts, which ``python -O``
strips). Writing is atomic: a temporary file beside the destination, fsynced, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np

from tfkit.errors import DataError
from tfkit.fsutil import fsync_dir

MAGIC = b"TFKITTOK"
"""First 8 bytes of every token file."""
HEADER_SIZE = 4096
"""Bytes before the first token (magic + length + JSON + zero padding)."""
FORMAT_VERSION = 1
"""``format_version`` of a file without a loss mask (byte-identical to files of earlier tfkit versions)."""
MASKED_VERSION = 2
"""``format_version`` of a file with a loss mask after the ids."""
FORMAT_VERSIONS = (FORMAT_VERSION, MASKED_VERSION)
"""The versions this code reads."""
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
"""Supported on-disk token dtypes (little-endian)."""
UINT16_MAX_VOCAB = 65536
"""Largest vocabulary whose ids all fit in uint16 (ids 0..65535)."""
UINT32_MAX_VOCAB = 2**32
"""Largest vocabulary whose ids all fit in uint32 (ids 0..2^32-1)."""
MAX_COUNT = 2**53 - 1
"""Largest ``n_tokens`` / ``n_bytes`` a header may hold: every integer up to it is exact as a JSON
number read as a double (2^53 is the first that is not)."""
FINGERPRINT_WHOLE_MAX = 64 << 20
"""Files up to this many bytes are hashed whole by :meth:`TokenFile.fingerprint`; larger ones are sampled."""
FINGERPRINT_EDGE = 1 << 20
"""Bytes hashed at each end of a sampled file."""
FINGERPRINT_BLOCK = 64 << 10
"""Bytes in each evenly spaced block of a sampled file."""
FINGERPRINT_BLOCKS = 64
"""Evenly spaced blocks hashed in a sampled file (about 4 MiB, plus the two ends)."""

_PREFIX = struct.Struct("<8sI")
_WRITE_STEP = 1 << 22
_REMAKE = "re-create it with `tfkit prepare FILES… --tokenizer tokenizer.json --out FILE` (or `tfkit dummy-data`)"


def dtype_for_vocab(vocab_size: int) -> str:
    """Name of the smallest supported dtype holding ids ``0..vocab_size-1``: ``"uint16"`` or ``"uint32"``.

    Raises:
        DataError: vocab_size < 1 or > 2**32.
    """
    if vocab_size < 1 or vocab_size > UINT32_MAX_VOCAB:
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
        n_loss_tokens: tokens whose loss-mask bit is set (version 2; 0 in version 1, which has no mask).
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
    n_loss_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The header as a JSON-safe dict (the exact keys written to the file; version 1 headers
        keep the keys of earlier tfkit versions)."""
        d = asdict(self)
        if self.format_version == FORMAT_VERSION:
            d.pop("n_loss_tokens")
        return d

    @property
    def has_mask(self) -> bool:
        """Whether a loss mask follows the ids (format version 2)."""
        return self.format_version == MASKED_VERSION

    @property
    def mask_bytes(self) -> int:
        """Bytes of the loss mask after the ids (0 without one)."""
        return (self.n_tokens + 7) // 8 if self.has_mask else 0

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "token file") -> "TokenFileHeader":
        """Build and validate a header from a dict (as read from the file's JSON).

        Raises:
            DataError: a key is missing or has the wrong type; the version/dtype is unsupported; the
                dtype cannot hold the vocabulary (uint16 above 65,536 ids, uint32 above 2^32); a count
                is negative or ``n_tokens``/``n_bytes`` ≥ 2^53 (not exact in JSON); zero tokens; or
                ``n_documents`` is outside ``1 … n_tokens`` (a document is at least one token).
        """
        if not isinstance(data, dict):
            raise DataError(f"`{where}`: header is not a JSON object", f"the file is corrupt; {_REMAKE}")
        kinds = {"format_version": int, "dtype": str, "n_tokens": int, "vocab_size": int, "tokenizer_hash": str,
                 "eot_id": int, "n_documents": int, "source_fingerprint": str, "n_bytes": int, "n_loss_tokens": int}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in ("n_bytes", "n_loss_tokens"):
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
        if h.format_version not in FORMAT_VERSIONS:
            raise DataError(f"`{where}`: unsupported format_version {h.format_version} (this tfkit reads "
                            f"{' and '.join(map(str, FORMAT_VERSIONS))})", f"upgrade tfkit, or {_REMAKE}")
        if not 0 <= h.n_loss_tokens <= (h.n_tokens if h.has_mask else 0):
            raise DataError(f"`{where}`: header n_loss_tokens {h.n_loss_tokens} is out of range for a version "
                            f"{h.format_version} file of {h.n_tokens} tokens", f"the file is corrupt; {_REMAKE}")
        if h.dtype not in DTYPES:
            raise DataError(f"`{where}`: unsupported dtype {h.dtype!r} (expected uint16 or uint32)", _REMAKE)
        if h.vocab_size < 1:
            raise DataError(f"`{where}`: header vocab_size {h.vocab_size} must be positive", _REMAKE)
        if h.dtype == "uint16" and h.vocab_size > UINT16_MAX_VOCAB:
            raise DataError(f"`{where}`: dtype uint16 cannot hold vocab_size {h.vocab_size} (ids above 65535 would wrap)",
                            f"{_REMAKE}; vocabularies above 65,536 are stored as uint32")
        if h.vocab_size > UINT32_MAX_VOCAB:
            raise DataError(f"`{where}`: dtype {h.dtype} cannot hold vocab_size {h.vocab_size} "
                            f"(ids are stored as uint32, so at most 2^32 = {UINT32_MAX_VOCAB} ids)",
                            f"the file is corrupt; {_REMAKE}")
        if h.n_tokens < 0 or h.n_documents < 0 or h.n_bytes < 0:
            raise DataError(f"`{where}`: header has a negative count", f"the file is corrupt; {_REMAKE}")
        for name in ("n_tokens", "n_bytes"):
            if getattr(h, name) > MAX_COUNT:
                raise DataError(f"`{where}`: header {name} {getattr(h, name)} is out of range (0 … 2^53 - 1, "
                                "the largest count JSON stores exactly)", f"the file is corrupt; {_REMAKE}")
        if h.n_tokens == 0:
            raise DataError(f"token file `{where}` holds zero tokens", f"prepare it from non-empty text; {_REMAKE}")
        if not 1 <= h.n_documents <= h.n_tokens:
            raise DataError(f"`{where}`: header says {h.n_documents} documents for {h.n_tokens} tokens "
                            f"(expected 1 … {h.n_tokens}: a document is at least one token)",
                            f"the file is corrupt; {_REMAKE}")
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
    end = _PREFIX.size + length
    raw = head[_PREFIX.size:end]
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"`{path}`: header JSON is unreadable ({exc})", f"the file is corrupt; {_REMAKE}") from None
    padding = head[end:HEADER_SIZE]
    nonzero = len(padding) - len(padding.lstrip(b"\0"))
    if nonzero < len(padding):
        offset = end + nonzero
        raise DataError(f"`{path}`: non-zero byte 0x{head[offset]:02x} at offset {offset} in the header padding "
                        f"(bytes {end} … {HEADER_SIZE - 1} must be zero)", f"the file is corrupt; {_REMAKE}")
    return TokenFileHeader.from_dict(data, where=str(path))


class LossMask:
    """A read-only view of a token file's loss mask from token ``base`` on: which tokens the loss
    counts, looked up by position without unpacking the whole mask (it stays on disk).

    Args:
        bits: the packed mask (little bit order), usually a memmap.
        base: the token position of index 0 of this view.
        length: tokens in the view.
    """

    def __init__(self, bits: np.ndarray, base: int, length: int) -> None:
        self.bits, self.base, self.length = bits, int(base), int(length)

    def __len__(self) -> int:
        return self.length

    def at(self, idx: np.ndarray) -> np.ndarray:
        """Mask bits at positions ``idx`` (any shape, int) of this view -> bool array of that shape."""
        pos = np.asarray(idx, dtype=np.int64) + self.base
        return (np.asarray(self.bits[pos >> 3]) >> (pos & 7).astype(np.uint8)) & 1 == 1

    def slice(self, start: int, end: int) -> "LossMask":
        """The view of positions ``start .. end-1`` (as ``tokens[start:end]``)."""
        return LossMask(self.bits, self.base + start, end - start)

    def count(self) -> int:
        """Tokens of the view the loss counts."""
        return int(sum(self.at(np.arange(s, min(s + (1 << 22), self.length))).sum()
                       for s in range(0, self.length, 1 << 22)))


class TokenFile:
    """A validated, memory-mapped token file.

    Use :meth:`open`; do not call the constructor directly.

    Attributes:
        path: the file.
        header: its :class:`TokenFileHeader`.
        tokens: read-only ``np.memmap`` of shape ``(n_tokens,)`` and dtype ``<u2`` or ``<u4``.
    """

    def __init__(self, path: Path, header: TokenFileHeader, tokens: np.ndarray,
                 mask_bits: Optional[np.ndarray] = None) -> None:
        self.path = path
        self.header = header
        self.tokens = tokens
        self._mask_bits = mask_bits  # (ceil(n_tokens / 8),) uint8, packed little bit order

    @property
    def has_mask(self) -> bool:
        """Whether the file has a loss mask (conversations prepared by tfkit 0.x with masks)."""
        return self._mask_bits is not None

    def mask_view(self) -> Optional[LossMask]:
        """The whole loss mask as a :class:`LossMask` (None without one)."""
        return None if self._mask_bits is None else LossMask(self._mask_bits, 0, self.header.n_tokens)

    def loss_mask(self, start: int = 0, end: Optional[int] = None) -> Optional[np.ndarray]:
        """The loss mask of tokens ``start .. end-1`` as a bool array (True = the loss counts the
        token), or None for a file without a mask (every token counts).

        Shapes:
            -> (end - start,) bool.
        """
        if self._mask_bits is None:
            return None
        end = self.header.n_tokens if end is None else end
        if end <= start:
            return np.zeros(0, dtype=bool)
        raw = np.asarray(self._mask_bits[start // 8:(end + 7) // 8])
        bits = np.unpackbits(raw, bitorder="little").astype(bool)
        return bits[start % 8:start % 8 + (end - start)]

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "TokenFile":
        """Open and validate a token file.

        Only the header and the file size are read; :meth:`check_ids` scans the ids.

        Raises:
            DataError: missing or empty file, wrong magic, unreadable header JSON, non-zero header
                padding, an invalid header (see :meth:`TokenFileHeader.from_dict`: unsupported version
                or dtype, out-of-range counts, zero tokens), or a file size that is not
                ``HEADER_SIZE + n_tokens * itemsize`` (truncated, trailing bytes or dtype mismatch).
        """
        path = Path(path)
        h = _read_header(path)
        size = path.stat().st_size
        body = size - HEADER_SIZE - h.mask_bytes
        if body < 0:
            raise DataError(f"`{path}` is truncated: {size} bytes cannot hold its loss mask of {h.mask_bytes} bytes",
                            f"the file is incomplete; {_REMAKE}")
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
        tokens = np.memmap(path, dtype=DTYPES[h.dtype], mode="r", offset=HEADER_SIZE, shape=(h.n_tokens,))
        mask = None
        if h.has_mask:
            mask = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_SIZE + h.n_tokens * h.itemsize,
                             shape=(h.mask_bytes,))
        return cls(path, h, tokens, mask)

    def __len__(self) -> int:
        return self.header.n_tokens

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, n_tokens={self.header.n_tokens}, vocab_size={self.header.vocab_size})"

    def verify(self, vocab_size: Optional[int] = None, chunk: int = 1 << 24) -> None:
        """Check the ids against the header in one chunked scan of the data.

        Every id must be below ``vocab_size`` (default: the header's), and the documents counted by
        :func:`count_documents`' rule (EOT ids, plus one when the data does not end with EOT) must
        equal the header's ``n_documents``.

        Args:
            vocab_size: exclusive upper bound on ids (a model's or tokenizer's vocabulary size).
            chunk: tokens scanned per step (bounds memory to about ``chunk * 8`` bytes).

        Raises:
            DataError: "`path`: token id X ≥ vocab_size V at offset O" for the first offending id, or
                "`path`: header says N documents but the data holds M".
        """
        v = self.header.vocab_size if vocab_size is None else int(vocab_size)
        eot = self.header.eot_id
        tokens = self.tokens
        n = len(tokens)
        eots = 0
        for start in range(0, n, chunk):
            part = tokens[start:start + chunk]
            find_id_out_of_range(part, v, where=f"`{self.path}`", chunk=chunk, base=start)
            eots += int(np.count_nonzero(part == eot))
        docs = eots + (1 if n and int(tokens[n - 1]) != eot else 0)
        if docs != self.header.n_documents:
            raise DataError(f"`{self.path}`: header says {self.header.n_documents} documents but the data holds {docs} "
                            f"(end-of-text id {eot})", f"the file is corrupt; {_REMAKE}")
        if self._mask_bits is not None:
            counted = sum(int(np.unpackbits(np.asarray(self._mask_bits[s:s + chunk])).sum())
                          for s in range(0, len(self._mask_bits), chunk))  # padding bits are written as 0
            if counted != self.header.n_loss_tokens:
                raise DataError(f"`{self.path}`: header says {self.header.n_loss_tokens} loss tokens but the mask "
                                f"holds {counted}", f"the file is corrupt; {_REMAKE}")

    def check_ids(self, vocab_size: Optional[int] = None, chunk: int = 1 << 24) -> None:
        """Check every id is below ``vocab_size`` (default: the header's); the same one scan as :meth:`verify`.

        The scan also counts documents, so a header whose ``n_documents`` disagrees with the data is
        refused here too, at no extra pass over the file.

        Raises:
            DataError: see :meth:`verify`.
        """
        self.verify(vocab_size, chunk=chunk)

    def fingerprint(self) -> str:
        """A cheap content fingerprint of the file as it is on disk now, to notice that it changed.

        sha256 over the header JSON bytes, the file size (bytes) and the content: the whole file when
        it is at most :data:`FINGERPRINT_WHOLE_MAX` (64 MiB), otherwise a sample: the first and last
        :data:`FINGERPRINT_EDGE` (1 MiB) plus :data:`FINGERPRINT_BLOCKS` (64) evenly spaced blocks of
        :data:`FINGERPRINT_BLOCK` (64 KiB), about 6 MiB read whatever the size. Trade-off: the sample
        catches a re-prepared, re-split, truncated or extended file (the header and size change) and
        most edits, but not every single flipped byte of a multi-GB file; the whole-file hash does.

        Returns:
            ``"sha256:<64 hex>"`` for a whole-file hash, ``"sample-sha256:<64 hex>"`` for a sampled one.

        Raises:
            DataError: the file cannot be read any more (removed or unreadable).
        """
        h = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(HEADER_SIZE)
                length = _PREFIX.unpack_from(head)[1] if len(head) >= _PREFIX.size else 0
                raw = head[_PREFIX.size:_PREFIX.size + length]
                h.update(struct.pack("<QQ", len(raw), size))
                h.update(raw)
                if size <= FINGERPRINT_WHOLE_MAX:
                    kind, spans = "sha256", [(0, size)]
                else:
                    kind, spans = "sample-sha256", _sample_spans(size)
                for start, left in spans:
                    f.seek(start)
                    while left > 0:
                        block = f.read(min(left, 1 << 20))
                        if not block:
                            break
                        h.update(block)
                        left -= len(block)
        except OSError as exc:
            raise DataError(f"cannot read token file `{self.path}` ({exc.strerror or exc})",
                            "check that the file still exists and is readable") from None
        return f"{kind}:{h.hexdigest()}"


def _sample_spans(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` byte spans that :meth:`TokenFile.fingerprint` hashes in a file of ``size`` bytes."""
    edge, block, k = FINGERPRINT_EDGE, FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS
    spans = [(0, min(edge, size))]
    last = max(size - block, 0)
    spans += [((i * last) // (k - 1), min(block, size)) for i in range(k)]
    spans.append((max(size - edge, 0), min(edge, size)))
    return spans


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


class _BitWriter:
    """Packs a stream of bools into bytes (little bit order) in a side file, then copies them after
    the ids: the loss mask of :func:`write_token_file`."""

    def __init__(self) -> None:
        self.fh = None
        self.path: Optional[Path] = None
        self.pending = np.zeros(0, dtype=bool)
        self.ones = 0

    def open(self, path: Path) -> None:
        self.path, self.fh = path, open(path, "wb")

    def write(self, mask: np.ndarray) -> None:
        self.ones += int(np.count_nonzero(mask))
        allbits = np.concatenate([self.pending, mask])
        full = allbits.size // 8 * 8
        self.fh.write(np.packbits(allbits[:full], bitorder="little").tobytes())
        self.pending = allbits[full:]

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink()

    def close_into(self, f) -> None:
        if self.pending.size:
            self.fh.write(np.packbits(self.pending, bitorder="little").tobytes())  # zero-padded
        self.fh.close()
        with open(self.path, "rb") as src:
            while block := src.read(1 << 22):
                f.write(block)
        self.path.unlink()


def write_token_file(
    path: Union[str, os.PathLike],
    chunks: Iterable[np.ndarray],
    vocab_size: int,
    tokenizer_hash: str,
    eot_id: int,
    source_fingerprint: str,
    n_bytes: Union[int, Callable[[], int]] = 0,
    n_documents: Union[int, Callable[[], int], None] = None,
    keep_mask: Optional[Callable[[], bool]] = None,
) -> TokenFileHeader:
    """Stream token ids into a new token file, atomically.

    The ids are written to ``<path>.tmp-<pid>`` as they arrive (constant memory), the header is then
    written with the final counts, the file is fsynced and renamed over ``path``. On any exception
    the temporary file is removed and an existing ``path`` is left untouched.

    Args:
        path: destination file.
        chunks: 1-D integer arrays (or lists) of ids, in order; or ``(ids, mask)`` pairs, ``mask``
            a bool array as long as ``ids`` (True = the loss counts the token), which makes a
            version-2 file with a loss mask. Every chunk must then carry one.
        vocab_size: ids must be in ``[0, vocab_size)``; picks uint16 (≤ 65,536) or uint32.
        tokenizer_hash: hash of the tokenizer that made the ids (``"none"`` if none did).
        eot_id: end-of-text id.
        source_fingerprint: see :class:`TokenFileHeader`.
        n_bytes: UTF-8 bytes of source text, or a callable evaluated after the last chunk.
        n_documents: ``None`` (the usual) to count EOT ids while writing, plus one if the data does
            not end with EOT; or the count the caller expects (an int, or a callable evaluated after
            the last chunk), checked against that count so no file is written whose header
            :meth:`TokenFile.verify` would refuse.
        keep_mask: evaluated after the last chunk; False drops the chunks' masks and writes a
            version-1 file (e.g. when no conversation was among the documents).

    Returns:
        The header written.

    Raises:
        DataError: an id outside ``[0, vocab_size)`` (nothing is written), zero tokens in total, a
            non-integer chunk, an ``n_documents`` that disagrees with the ids, or a header that
            :meth:`TokenFileHeader.from_dict` would refuse (e.g. ``n_bytes`` ≥ 2^53).
        OSError: the file cannot be written (e.g. disk full); the temporary file is removed.
    """
    path = Path(path)
    dtype_name = dtype_for_vocab(vocab_size)
    dtype = DTYPES[dtype_name]
    if not 0 <= eot_id < vocab_size:
        raise DataError(f"eot_id {eot_id} is outside the vocabulary (vocab_size {vocab_size})", "check the tokenizer")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp_mask = path.with_name(f"{path.name}.mask-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    n_tokens = 0
    eots = 0
    last = -1
    masked: Optional[bool] = None  # decided by the first chunk
    bits = _BitWriter()
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)
            for chunk in chunks:
                mask = None
                if isinstance(chunk, tuple):
                    chunk, mask = chunk
                arr = np.asarray(chunk)
                if arr.size == 0:
                    continue
                if masked is None:
                    masked = mask is not None
                    if masked:
                        bits.open(tmp_mask)
                if masked != (mask is not None) or (mask is not None and np.asarray(mask).size != arr.size):
                    raise DataError(f"writing `{path}`: every chunk needs a loss mask as long as its ids, or none does",
                                    "this is a bug in the caller; please report it")
                if mask is not None:
                    bits.write(np.asarray(mask, dtype=bool).reshape(-1))
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
            docs = eots + (1 if last != eot_id else 0)  # count_documents' rule
            if n_documents is not None:
                expected = int(n_documents() if callable(n_documents) else n_documents)
                if expected != docs:
                    raise DataError(f"writing `{path}`: {expected} documents expected but the ids hold {docs} "
                                    f"(end-of-text id {eot_id})", "this is a bug in the caller; please report it")
            nb = int(n_bytes() if callable(n_bytes) else n_bytes)
            if masked and keep_mask is not None and not keep_mask():
                masked = False
                bits.discard()
            header = TokenFileHeader(
                format_version=MASKED_VERSION if masked else FORMAT_VERSION, dtype=dtype_name, n_tokens=n_tokens,
                vocab_size=int(vocab_size), tokenizer_hash=str(tokenizer_hash), eot_id=int(eot_id), n_documents=docs,
                source_fingerprint=str(source_fingerprint), n_bytes=nb, n_loss_tokens=bits.ones if masked else 0,
            )
            if masked:
                bits.close_into(f)  # after the ids
            TokenFileHeader.from_dict(header.to_dict(), where=str(path))  # never write what open refuses
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
        for t in (tmp, tmp_mask):
            try:
                t.unlink()
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and not exc.filename and exc.errno:
            raise OSError(exc.errno, f"{exc.strerror or exc} writing", str(path)) from exc
        raise
    fsync_dir(path.parent)
    return header
