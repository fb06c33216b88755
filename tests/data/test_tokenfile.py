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
    assert write(tmp_path / "b.bin", [3, 4], n_documents=1).n_documents == 1
    with pytest.raises(DataError, match="7 documents expected but the ids hold 1"):
        write(tmp_path / "c.bin", [3, 4], n_documents=7)  # a header check_ids would refuse is never written
    assert not (tmp_path / "c.bin").exists()


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
    raw_file(p, good_header(format_version=3), b"\0" * 8)
    with pytest.raises(DataError, match="unsupported format_version 3 \\(this tfkit reads 1 and 2\\)"):
        TokenFile.open(p)
    h = good_header()
    del h["vocab_size"]
    raw_file(p, h, b"\0" * 8)
    with pytest.raises(DataError, match="header has no `vocab_size`"):
        TokenFile.open(p)
    raw_file(p, good_header(n_tokens="4"), b"\0" * 8)
    with pytest.raises(DataError, match="`n_tokens` = '4' is not a int"):
        TokenFile.open(p)


# ---- header bounds, padding and the document count (issue "Bounds and encodings")


def test_vocab_size_above_uint32(tmp_path):
    p = tmp_path / "v.bin"
    raw_file(p, good_header(dtype="uint32", vocab_size=2**32 + 1), np.arange(4, dtype="<u4").tobytes())
    with pytest.raises(DataError, match=rf"`{p}`: dtype uint32 cannot hold vocab_size 4294967297") as e:
        TokenFile.open(p)
    assert "corrupt" in e.value.hint
    raw_file(p, good_header(dtype="uint32", vocab_size=2**32), np.arange(4, dtype="<u4").tobytes())
    assert TokenFile.open(p).header.vocab_size == 2**32  # ids 0 … 2^32-1 all fit


@pytest.mark.parametrize("field", ["n_tokens", "n_bytes"])
def test_counts_must_be_exact_in_json(tmp_path, field):
    p = tmp_path / "n.bin"
    raw_file(p, good_header(**{field: 2**53}), b"\0" * 8)
    with pytest.raises(DataError, match=rf"`{p}`: header {field} 9007199254740992 is out of range \(0 … 2\^53 - 1"):
        TokenFile.open(p)
    with pytest.raises(DataError, match="n_bytes 9007199254740992 is out of range"):  # and never written
        write(tmp_path / "w.bin", [1, 2], n_bytes=2**53)
    assert not (tmp_path / "w.bin").exists()


def test_document_count_bounds(tmp_path):
    p = tmp_path / "d.bin"
    raw_file(p, good_header(n_tokens=4, n_documents=5), np.zeros(4, dtype="<u2").tobytes())
    with pytest.raises(DataError, match=rf"`{p}`: header says 5 documents for 4 tokens \(expected 1 … 4") as e:
        TokenFile.open(p)
    assert "corrupt" in e.value.hint and "tfkit prepare" in e.value.hint
    raw_file(p, good_header(n_tokens=4, n_documents=0), np.ones(4, dtype="<u2").tobytes())
    with pytest.raises(DataError, match="header says 0 documents for 4 tokens"):
        TokenFile.open(p)


def test_nonzero_header_padding(tmp_path):
    p = tmp_path / "pad.bin"
    write(p, [1, 2, 0])
    data = bytearray(p.read_bytes())
    (length,) = struct.unpack("<I", data[8:12])
    data[12 + length + 7] = 0xAB
    data[HEADER_SIZE - 1] = 0x01  # only the first one is named
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"`{p}`: non-zero byte 0xab at offset {12 + length + 7} in the header "
                                        rf"padding \(bytes {12 + length} … 4095 must be zero\)") as e:
        TokenFile.open(p)
    assert "corrupt" in e.value.hint
    data[12 + length + 7] = 0
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="non-zero byte 0x01 at offset 4095"):
        TokenFile.open(p)


def test_check_ids_also_checks_the_document_count(tmp_path):
    p = tmp_path / "docs.bin"
    ids = [5, 0, 6, 7, 0, 8]  # 3 documents: two end with EOT, the last does not
    raw_file(p, good_header(n_tokens=6, n_documents=2), np.array(ids, dtype="<u2").tobytes())
    tf = TokenFile.open(p)  # the header alone is plausible
    with pytest.raises(DataError, match=rf"`{p}`: header says 2 documents but the data holds 3") as e:
        tf.verify()
    assert "corrupt" in e.value.hint
    with pytest.raises(DataError, match="header says 2 documents but the data holds 3"):
        tf.check_ids(100, chunk=4)  # the same one scan, across chunk boundaries
    with pytest.raises(DataError, match="token id 8 ≥ vocab_size 8 at offset 5"):
        tf.check_ids(8, chunk=4)  # a bad id is reported first, at its offset in the whole file
    raw_file(p, good_header(n_tokens=6, n_documents=3), np.array(ids, dtype="<u2").tobytes())
    TokenFile.open(p).check_ids(100, chunk=4)
    TokenFile.open(p).verify(chunk=1)


def test_files_the_writers_make_pass_verify(tok, tmp_path):
    from tfkit.data.dummy import make_dummy
    from tfkit.data.prepare import prepare
    from tfkit.data.split import split_token_file

    text = tmp_path / "t.jsonl"
    rows = ["first <|endoftext|> typed by hand", "second", "third\nline", "fourth"]  # a literal EOT in text
    text.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    h = prepare([text], tok, tmp_path / "c.bin")
    assert h.n_documents == 5  # the typed end-of-text is an EOT id, so it ends a document too
    TokenFile.open(tmp_path / "c.bin").verify()
    r = split_token_file(tmp_path / "c.bin", 0.3, tokenizer=tok)
    TokenFile.open(r.train_path).verify()
    TokenFile.open(r.val_path).verify()
    make_dummy(tmp_path / "d.bin", 10_000, 50, seed=3)  # eot_id 0 drawn at random
    TokenFile.open(tmp_path / "d.bin").verify()


def test_fingerprint_whole_file(tmp_path, tok):
    from tfkit.data.prepare import prepare

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("To be, or not to be, that is the question.\n")
    b.write_text("Whether 'tis nobler in the mind to suffer.\n")
    prepare([a], tok, tmp_path / "c.bin")
    fp = TokenFile.open(tmp_path / "c.bin").fingerprint()
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert TokenFile.open(tmp_path / "c.bin").fingerprint() == fp  # deterministic
    (tmp_path / "copy.bin").write_bytes((tmp_path / "c.bin").read_bytes())
    assert TokenFile.open(tmp_path / "copy.bin").fingerprint() == fp  # a byte-identical copy
    prepare([b], tok, tmp_path / "c.bin")  # re-prepared from other text
    assert TokenFile.open(tmp_path / "c.bin").fingerprint() != fp
    data = bytearray((tmp_path / "copy.bin").read_bytes())
    data[HEADER_SIZE + 3] ^= 0x01  # one flipped bit in the ids
    (tmp_path / "flip.bin").write_bytes(bytes(data))
    assert TokenFile.open(tmp_path / "flip.bin").fingerprint() != fp


def test_fingerprint_samples_a_large_file(tmp_path, monkeypatch):
    import tfkit.data.tokenfile as tokenfile

    # the real sizes (64 MiB whole, 1 MiB ends, 64 blocks of 64 KiB) scaled down, the ends still past the header
    monkeypatch.setattr(tokenfile, "FINGERPRINT_WHOLE_MAX", 64 << 10)
    monkeypatch.setattr(tokenfile, "FINGERPRINT_EDGE", 8 << 10)
    monkeypatch.setattr(tokenfile, "FINGERPRINT_BLOCK", 64)
    ids = np.random.default_rng(0).integers(1, 100, size=200_000)
    p = tmp_path / "big.bin"
    write(p, ids)
    size = p.stat().st_size
    fp = TokenFile.open(p).fingerprint()
    assert fp.startswith("sample-sha256:") and len(fp) == len("sample-sha256:") + 64
    sampled = tokenfile._sample_spans(size)
    assert len(sampled) == 66 and sampled[0] == (0, 8192) and sampled[-1] == (size - 8192, 8192)
    assert sampled[-2] == (size - 64, 64)  # the last block ends at the end of the file

    def changed(offset):
        data = bytearray(p.read_bytes())
        data[offset] ^= 0xFF
        (tmp_path / "x.bin").write_bytes(bytes(data))
        return TokenFile.open(tmp_path / "x.bin").fingerprint() != fp

    assert changed(HEADER_SIZE + 10) and changed(size - 1) and changed(sampled[30][0] + 5)
    gap = sampled[30][0] + 64 + 100  # between two sampled blocks: the documented blind spot
    assert not changed(gap)
    write(tmp_path / "x.bin", ids[:-1])  # truncated by one token: header and size differ
    assert TokenFile.open(tmp_path / "x.bin").fingerprint() != fp


def test_fingerprint_of_a_removed_file(tmp_path):
    p = tmp_path / "gone.bin"
    write(p, [1, 2, 0])
    tf = TokenFile.open(p)
    p.unlink()
    with pytest.raises(DataError, match=rf"cannot read token file `{p}`"):
        tf.fingerprint()
