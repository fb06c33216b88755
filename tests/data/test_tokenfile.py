"""The token file format: exact header bytes, atomic writes, and every malformed-file case."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from tfkit.data.tokenfile import HEADER_SIZE, MAGIC, TokenFile, TokenFileHeader, write_token_file
from tfkit.errors import DataError


def write(path, ids, vocab=100, **kw):
    args = dict(tokenizer_hash="abc", eot_id=0, source_fingerprint="fp")
    args.update(kw)
    return write_token_file(path, [np.asarray(ids)], vocab_size=vocab, **args)


def raw_file(path, header: dict, body: bytes = b"", length=None, magic=MAGIC):
    blob = json.dumps(header).encode()
    head = magic + struct.pack("<I", len(blob) if length is None else length) + blob
    path.write_bytes(head + b"\0" * (HEADER_SIZE - len(head)) + body)


def good_header(**kw):
    h = dict(format_version=1, dtype="uint16", n_tokens=4, vocab_size=100, tokenizer_hash="abc", eot_id=0,
             n_documents=1, source_fingerprint="fp", n_bytes=0)
    h.update(kw)
    return h


def test_layout_and_header_values(tmp_path):
    p = tmp_path / "c.bin"
    h = write_token_file(p, [np.array([5, 6, 0]), [7, 8], np.array([], dtype=np.int64), np.array([9, 0])],
                         vocab_size=100, tokenizer_hash="abc", eot_id=0, source_fingerprint="fp", n_bytes=lambda: 42)
    data = p.read_bytes()
    assert data[:8] == b"TFKITTOK"
    (length,) = struct.unpack("<I", data[8:12])
    assert json.loads(data[12:12 + length]) == h.to_dict()
    assert set(data[12 + length:HEADER_SIZE]) == {0}
    assert len(data) == HEADER_SIZE + 7 * 2
    assert np.frombuffer(data[HEADER_SIZE:], dtype="<u2").tolist() == [5, 6, 0, 7, 8, 9, 0]
    assert h == TokenFileHeader(format_version=1, dtype="uint16", n_tokens=7, vocab_size=100, tokenizer_hash="abc",
                                eot_id=0, n_documents=2, source_fingerprint="fp", n_bytes=42)
    tf = TokenFile.open(p)
    assert tf.header == h and len(tf) == 7 and tf.path == p
    assert tf.tokens.dtype == np.dtype("<u2") and tf.tokens.ndim == 1
    assert not tf.tokens.flags.writeable
    assert TokenFileHeader.from_dict(h.to_dict()) == h


def test_dtype_follows_vocab_size(tmp_path):
    assert write(tmp_path / "a.bin", [65535, 0], vocab=65536).dtype == "uint16"
    h = write(tmp_path / "b.bin", [65536, 70000, 0], vocab=70001)
    assert h.dtype == "uint32"
    tf = TokenFile.open(tmp_path / "b.bin")
    assert tf.tokens.tolist() == [65536, 70000, 0]  # no uint16 wrap-around (transformers#2825)
    assert (tmp_path / "b.bin").stat().st_size == HEADER_SIZE + 3 * 4


def test_document_count_without_final_eot(tmp_path):
    assert write(tmp_path / "a.bin", [3, 0, 4, 4]).n_documents == 2
    assert write(tmp_path / "b.bin", [3, 4], n_documents=7).n_documents == 7


def test_id_out_of_range_is_refused_before_writing(tmp_path):
    p = tmp_path / "c.bin"
    write(p, [1, 2, 3])
    before = p.read_bytes()
    with pytest.raises(DataError, match=r"token id 100 ≥ vocab_size 100 at offset 4"):
        write_token_file(p, [np.array([1, 2, 3]), np.array([4, 100, 5])], vocab_size=100, tokenizer_hash="x",
                         eot_id=0, source_fingerprint="fp")
    assert p.read_bytes() == before  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["c.bin"]  # and no temporary file is left
    with pytest.raises(DataError, match=r"negative token id -1 at offset 1"):
        write(tmp_path / "d.bin", np.array([1, -1]))
    assert not (tmp_path / "d.bin").exists()


def test_failure_mid_stream_leaves_nothing(tmp_path):
    def chunks():
        yield np.array([1, 2, 3])
        raise RuntimeError("disk exploded")

    with pytest.raises(RuntimeError):
        write_token_file(tmp_path / "c.bin", chunks(), vocab_size=10, tokenizer_hash="x", eot_id=0, source_fingerprint="f")
    assert os.listdir(tmp_path) == []


def test_empty_stream_is_refused(tmp_path):
    with pytest.raises(DataError, match="no tokens"):
        write_token_file(tmp_path / "c.bin", [], vocab_size=10, tokenizer_hash="x", eot_id=0, source_fingerprint="f")
    assert os.listdir(tmp_path) == []


def test_check_ids_reports_first_offender(tmp_path):
    p = tmp_path / "c.bin"
    ids = np.zeros(1000, dtype=np.int64)
    ids[[777, 900]] = [60, 99]
    write(p, ids)
    tf = TokenFile.open(p)
    tf.check_ids(100)
    with pytest.raises(DataError, match=rf"`{p}`: token id 60 ≥ vocab_size 50 at offset 777") as e:
        tf.check_ids(50, chunk=64)
    assert e.value.hint
    with pytest.raises(DataError, match="token id 99 ≥ vocab_size 64 at offset 900"):
        tf.check_ids(64, chunk=100)


# ---- malformed files (reliability.md "Memmap header is checked"): one clear DataError each


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        TokenFile.open(tmp_path / "nope.bin")
    assert "tfkit prepare" in e.value.hint


def test_empty_file(tmp_path):
    p = tmp_path / "e.bin"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"is empty \(0 bytes\)"):
        TokenFile.open(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "nanogpt.bin"
    np.arange(5000, dtype=np.uint16).tofile(p)  # a headerless nanoGPT-style file
    with pytest.raises(DataError, match="not a tfkit token file.*wrong magic") as e:
        TokenFile.open(p)
    assert "tfkit prepare" in e.value.hint


def test_truncated_header(tmp_path):
    p = tmp_path / "t.bin"
    write(p, [1, 2, 3])
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated"):
        TokenFile.open(p)


def test_truncated_body(tmp_path):
    p = tmp_path / "t.bin"
    write(p, list(range(50)))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated: header says 50 tokens but the file holds 45"):
        TokenFile.open(p)


def test_size_not_a_multiple_of_itemsize(tmp_path):
    p = tmp_path / "odd.bin"
    write(p, list(range(50)))
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match="not a multiple of the uint16 item size"):
        TokenFile.open(p)


def test_dtype_mismatch(tmp_path):
    p = tmp_path / "m.bin"
    raw_file(p, good_header(dtype="uint32", n_tokens=4), np.arange(4, dtype="<u2").tobytes())  # wrote 2-byte ids
    with pytest.raises(DataError, match="truncated: header says 4 tokens but the file holds 2"):
        TokenFile.open(p)
    raw_file(p, good_header(dtype="uint16", vocab_size=100_000, n_tokens=2), np.arange(2, dtype="<u2").tobytes())
    with pytest.raises(DataError, match="dtype uint16 cannot hold vocab_size 100000"):
        TokenFile.open(p)
    raw_file(p, good_header(dtype="int8"), b"\0" * 4)
    with pytest.raises(DataError, match="unsupported dtype 'int8'"):
        TokenFile.open(p)


def test_trailing_bytes(tmp_path):
    p = tmp_path / "t.bin"
    raw_file(p, good_header(n_tokens=2), np.arange(4, dtype="<u2").tobytes())
    with pytest.raises(DataError, match="holds 4 tokens but its header says 2"):
        TokenFile.open(p)


def test_zero_tokens(tmp_path):
    p = tmp_path / "z.bin"
    raw_file(p, good_header(n_tokens=0))
    with pytest.raises(DataError, match="holds zero tokens"):
        TokenFile.open(p)


def test_bad_header_json_and_fields(tmp_path):
    p = tmp_path / "h.bin"
    head = MAGIC + struct.pack("<I", 9) + b"{not json"
    p.write_bytes(head + b"\0" * (HEADER_SIZE - len(head)))
    with pytest.raises(DataError, match="header JSON is unreadable"):
        TokenFile.open(p)
    raw_file(p, good_header(), length=5000)
    with pytest.raises(DataError, match="header length 5000 is out of range"):
        TokenFile.open(p)
    raw_file(p, good_header(format_version=2), b"\0" * 8)
    with pytest.raises(DataError, match="unsupported format_version 2"):
        TokenFile.open(p)
    h = good_header()
    del h["vocab_size"]
    raw_file(p, h, b"\0" * 8)
    with pytest.raises(DataError, match="header has no `vocab_size`"):
        TokenFile.open(p)
    raw_file(p, good_header(n_tokens="4"), b"\0" * 8)
    with pytest.raises(DataError, match="`n_tokens` = '4' is not a int"):
        TokenFile.open(p)
