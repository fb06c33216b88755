"""Finding inputs and reading documents: BOM, CRLF, invalid UTF-8, JSONL fields, messages, streaming."""

from __future__ import annotations

import gzip
import json

import pytest

from tfkit.data.sources import expand_inputs, fingerprint, iter_documents
from tfkit.errors import DataError


def docs(*files, **kw):
    return list(iter_documents(list(files), **kw))


def test_bom_and_crlf_are_normalised(tmp_path):
    p = tmp_path / "win.txt"
    p.write_bytes(b"\xef\xbb\xbfline one\r\nline two\rline three\r\n")
    (d,) = docs(p)
    assert d.text == "line one\nline two\nline three\n"
    assert d.source == str(p) and d.final


def test_non_ascii_text_survives(tmp_path):
    text = "naïve café — Ελληνικά 日本語 🎉 e\u0301\n"
    p = tmp_path / "u.txt"
    p.write_text(text, encoding="utf-8")
    assert [d.text for d in docs(p)] == [text]


def test_invalid_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf".encode() + b"\xe9 au lait")
    with pytest.raises(DataError, match=r"latin1.txt` is not valid UTF-8 \(byte offset 3") as e:
        docs(p)
    assert "iconv" in e.value.hint


def test_invalid_utf8_offset_in_a_later_piece(tmp_path):
    p = tmp_path / "late.txt"
    p.write_bytes(b"\xef\xbb\xbf" + b"abcd\n" * 1000 + b"ok \xff")
    with pytest.raises(DataError, match="byte offset 5006"):  # the BOM counts: offsets are into the file
        docs(p, piece_chars=64)


def test_utf16_and_nul_are_refused(tmp_path):
    p = tmp_path / "utf16.txt"
    p.write_bytes("hello".encode("utf-16"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        docs(p)
    q = tmp_path / "nul.txt"
    q.write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match="NUL byte at byte offset 3"):
        docs(q)


def test_whitespace_only_file_is_refused(tmp_path):
    p = tmp_path / "blank.txt"
    p.write_text("  \n\n\t\n")
    with pytest.raises(DataError, match="contains only whitespace"):
        docs(p)


def test_long_file_streams_in_pieces_that_form_one_document(tmp_path):
    lines = [f"line {i} of a long play\r\n" for i in range(3000)]
    p = tmp_path / "long.txt.gz"
    with gzip.open(p, "wb") as f:
        f.write("".join(lines).encode())
    pieces = docs(p, piece_chars=1000)
    assert len(pieces) > 20
    assert [d.final for d in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(d.text.endswith("\n") for d in pieces[:-1])  # cut at newlines
    assert all(len(d.text) < 2000 for d in pieces)  # memory is bounded by the piece size
    assert "".join(d.text for d in pieces) == "".join(lines).replace("\r\n", "\n")


def test_crlf_split_across_pieces(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"a" * 63 + b"\r\n" + b"b" * 100 + b"\r\n")  # \r ends the first 64-byte read
    assert "".join(d.text for d in docs(p, piece_chars=64)) == "a" * 63 + "\n" + "b" * 100 + "\n"


def test_progress_sums_to_file_sizes(tmp_path, play):
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        for i in range(3000):
            f.write(json.dumps({"text": f"doc {i}"}) + "\n")
    seen = []
    docs(play, gz, on_progress=seen.append, piece_chars=10_000)
    assert all(n > 0 for n in seen) and len(seen) > 3
    assert sum(seen) == play.stat().st_size + gz.stat().st_size


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


def test_jsonl_field_detection(tmp_path):
    p = jsonl(tmp_path, [
        {"id": 1, "text": "from text", "content": "not this"},
        {"content": "from content"}, {"message": "from message"}, {"body": "from body"}, {"output": "from output"},
        "", {"message": {"role": "user"}, "body": "dict message skipped"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"text": ""},  # empty text: skipped, no document
    ])
    got = docs(p)
    assert [d.text for d in got] == ["from text", "from content", "from message", "from body", "from output",
                                     "dict message skipped",
                                     "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n"]
    assert [d.source for d in got][:2] == [f"{p}:1", f"{p}:2"] and got[-1].source == f"{p}:8"
    assert all(d.final for d in got)


def test_text_field_option(tmp_path):
    p = jsonl(tmp_path, [{"text": "no", "story": "yes\r\nCRLF"}, {"story": "two"}])
    assert [d.text for d in docs(p, text_field="story")] == ["yes\nCRLF", "two"]
    q = jsonl(tmp_path, [{"story": "x"}, {"text": "y"}], name="q.jsonl")
    with pytest.raises(DataError, match=r"q.jsonl:2`: no field `story` \(fields: `text`\)"):
        docs(q, text_field="story")


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = jsonl(tmp_path, [{"text": "fine"}, '{"text": "broken'], name="bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:2`: malformed JSON") as e:
        docs(p)
    assert "JSON object" in e.value.hint
    q = jsonl(tmp_path, [{"title": "no text here"}], name="notext.jsonl")
    with pytest.raises(DataError, match=r"notext.jsonl:1`: no text field") as e:
        docs(q)
    assert "--text-field" in e.value.hint
    r = jsonl(tmp_path, ["[1, 2]"], name="list.jsonl")
    with pytest.raises(DataError, match=r"list.jsonl:1`: expected a JSON object, got list"):
        docs(r)
    s = jsonl(tmp_path, [{"messages": [{"role": "alien", "content": "x"}]}], name="roles.jsonl")
    with pytest.raises(DataError, match=r"roles.jsonl:1`: `messages`: messages\[0\] has role 'alien'"):
        docs(s)


def test_expand_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/sub/a.jsonl", "d/sub/c.json-lines.gz", "d/notes.md", "d/.hidden/x.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    got = expand_inputs([str(tmp_path / "d")])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["d/b.txt", "d/sub/a.jsonl", "d/sub/c.json-lines.gz"]
    got = expand_inputs([str(tmp_path / "d" / "**" / "*.jsonl"), str(tmp_path / "d" / "b.txt"),
                         tmp_path / "d" / "b.txt"])
    assert [p.name for p in got] == ["a.jsonl", "b.txt"]  # de-duplicated
    assert fingerprint(got) != fingerprint(got[:1])


@pytest.mark.parametrize("setup, arg, match", [
    (None, "missing.txt", "input `.*missing.txt` does not exist"),
    ("empty.txt", "empty.txt", r"input file `.*empty.txt` is empty \(0 bytes\)"),
    ("data.csv", "data.csv", "has an unsupported extension `.csv`"),
    (None, "*.txt", r"pattern `.*\*.txt` matches nothing"),
    ("folder/", "folder", "folder `.*folder` contains no"),
])
def test_expand_inputs_errors(tmp_path, setup, arg, match):
    if setup and setup.endswith("/"):
        (tmp_path / setup).mkdir()
    elif setup:
        (tmp_path / setup).write_bytes(b"" if setup == "empty.txt" else b"a,b\n")
    with pytest.raises(DataError, match=match):
        expand_inputs([str(tmp_path / arg)])
    with pytest.raises(DataError, match="no input files"):
        expand_inputs([])
