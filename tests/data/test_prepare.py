"""prepare: text/JSONL → token file with EOT after every document, exact counts, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfkit.data.prepare import iter_token_chunks, prepare
from tfkit.data.sources import fingerprint
from tfkit.data.tokenfile import TokenFile
from tfkit.errors import DataError


def test_prepare_text_files(tok, tmp_path, play):
    extra = tmp_path / "bom.txt"
    extra.write_bytes(b"\xef\xbb\xbfFirst line\r\nZweite Zeile \xc3\xa4\r\n")
    out = tmp_path / "corpus.bin"
    seen = []
    h = prepare([play, extra], tok, out, on_progress=seen.append)
    tf = TokenFile.open(out)
    assert tf.header == h
    assert h.vocab_size == tok.vocab_size == 512 and h.dtype == "uint16" and h.eot_id == 0
    assert h.tokenizer_hash == tok.hash and h.source_fingerprint == fingerprint([play, extra])
    assert h.n_documents == 2
    ids = tf.tokens.astype(np.int64)
    eots = np.flatnonzero(ids == 0)
    assert eots.tolist() == [len(tok.encode(play.read_text())), len(ids) - 1]
    assert tok.decode(ids[eots[0] + 1:-1]) == "First line\nZweite Zeile ä\n"
    assert h.n_bytes == play.stat().st_size + len("First line\nZweite Zeile ä\n".encode())
    assert sum(seen) == play.stat().st_size + extra.stat().st_size


def test_prepare_streams_long_files_with_one_eot(tok, tmp_path, play, monkeypatch):
    import tfkit.data.sources as sources

    import tfkit.data.prepare as prepare_mod

    monkeypatch.setattr(sources, "PIECE_CHARS", 4096)  # many pieces, as for a multi-GB file
    monkeypatch.setattr(prepare_mod, "SUB_CHARS", 1000)  # encoded in parts
    assert len(list(sources.iter_documents([play]))) > 20
    out = tmp_path / "c.bin"
    chunks = list(prepare_mod.encode_documents(sources.iter_documents([play]), tok, batch_chars=8192))
    assert len(chunks) > 10  # many batches, each bounded
    h = prepare([play], tok, out)
    assert np.array_equal(np.concatenate(chunks), TokenFile.open(out).tokens.astype(np.int64))
    ids = TokenFile.open(out).tokens
    assert int(np.count_nonzero(ids == 0)) == 1 and int(ids[-1]) == 0 and h.n_documents == 1
    assert tok.decode(ids[:-1]) == play.read_text()  # pieces cut at newlines decode to the whole file


def test_prepare_jsonl_with_messages(tok, tmp_path):
    p = tmp_path / "chat.jsonl"
    rows = [{"content": "plain doc"},
            {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    h = prepare([str(p)], tok, tmp_path / "chat.bin")
    ids = TokenFile.open(tmp_path / "chat.bin").tokens.tolist()
    assert h.n_documents == 2 and ids.count(0) == 2
    second = ids[ids.index(0) + 1:-1]
    assert [i for i in second if i < 5] == [1, 4, 2, 4, 3, 4]  # role and end tokens are single ids
    assert h.n_bytes == len(b"plain doc") + len(b"\nsys\n\nhi\n\nyo\n")  # special tokens count 0 bytes


def test_failed_prepare_keeps_the_old_file(tok, tmp_path, play):
    out = tmp_path / "c.bin"
    prepare([play], tok, out)
    before = out.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2`: malformed JSON"):
        prepare([play, bad], tok, out)
    assert out.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.jsonl", "c.bin"]


def test_output_must_not_be_an_input(tok, tmp_path):
    src = tmp_path / "text.txt"
    src.write_text("precious text\n")
    with pytest.raises(DataError, match="is one of the inputs"):
        prepare([src], tok, src)
    assert src.read_text() == "precious text\n"


def test_parts_cut_after_newlines():
    from tfkit.data.prepare import _parts

    text = "ab\ncd\n" + "x" * 25 + "\nend"
    parts = _parts(text, 10)
    assert "".join(parts) == text and all(len(p) <= 10 for p in parts)
    assert parts[:2] == ["ab\ncd\n", "xxxxxxxxxx"]


def test_iter_token_chunks_matches_file(tok, tmp_path, play):
    prepare([play], tok, tmp_path / "c.bin")
    stream = np.concatenate(list(iter_token_chunks([play], tok)))
    assert np.array_equal(stream, TokenFile.open(tmp_path / "c.bin").tokens.astype(np.int64))


def test_tokenize_temporary_memmaps_a_file_that_is_already_gone(tok, tmp_path, play, monkeypatch):
    import tempfile

    from tfkit.data.prepare import tokenize_temporary

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    during = []
    tf = tokenize_temporary([play], tok, on_progress=lambda n: during.append(sorted(folder.iterdir())))
    assert during and all(len(seen) == 1 for seen in during)  # encoding streams into one temporary folder
    assert list(folder.iterdir()) == [] and not tf.path.exists()  # removed before it returns
    assert isinstance(tf.tokens, np.memmap) and tf.header.tokenizer_hash == tok.hash
    stream = np.concatenate(list(iter_token_chunks([play], tok)))
    assert np.array_equal(tf.tokens.astype(np.int64), stream)  # still readable through the mapping
    tf.verify()

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n" * 1000 + b"\xff")
    with pytest.raises(DataError, match="not valid UTF-8"):
        tokenize_temporary([bad], tok)
    assert list(folder.iterdir()) == []  # nothing is left on error either
