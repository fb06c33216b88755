"""The data commands as a user runs them: tokenize, prepare, split, dummy-data.

Checks exit codes, data on stdout only with --json, human text and `error:`/`hint:` on stderr,
and no traceback on bad input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tfkit.cli.app import app
from tfkit.data.tokenfile import TokenFile
from tfkit.data.tokenizer import Tokenizer

runner = CliRunner()


def tf(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(r, code, *fragments):
    """One `error:` line naming the problem, a `hint:` line, nothing on stdout, no traceback."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: ") and len(lines) == 2, r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


@pytest.fixture
def tokfile(tmp_path, play):
    path = tmp_path / "tokenizer.json"
    r = tf("tokenize", play, "--vocab-size", 512, "--out", path)
    assert r.exit_code == 0, r.stderr
    return path


def test_tokenize_trains_and_reports_compression(tmp_path, play):
    out = tmp_path / "tok.json"
    r = tf("tokenize", play, "--vocab-size", 512, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert "vocab size 512" in r.stderr and "bytes/token" in r.stderr
    assert Tokenizer.load(out).vocab_size == 512

    r = tf("tokenize", play, "--vocab-size", 512, "--out", out)
    assert_clean_error(r, 2, f"`{out}` already exists", "--force")

    r = tf("tokenize", play, "--vocab-size", 300, "--out", out, "--force", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["vocab_size"] == 300 and data["tokenizer"] == str(out)
    assert data["bytes"] == play.stat().st_size and 1.0 < data["bytes_per_token"] < 3.0
    assert data["bytes_per_token"] == pytest.approx(data["bytes"] / data["tokens"], rel=1e-3)
    assert Tokenizer.load(out).vocab_size == 300  # overwritten


def test_tokenize_inspect(tokfile):
    text = "Fair is foul, 🎉 <|user|>"
    r = tf("tokenize", "--tokenizer", tokfile, "--encode", text, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    tok = Tokenizer.load(tokfile)
    assert data["ids"] == tok.encode(text) and data["n_tokens"] == len(data["ids"])
    assert [t["id"] for t in data["tokens"]] == data["ids"] and data["tokens"][-1]["text"] == "<|user|>"
    assert "".join(t["text"] for t in data["tokens"] if "\ufffd" not in t["text"]) == "Fair is foul,  <|user|>"
    assert sum(t["bytes"] for t in data["tokens"]) == len(text.encode()) - len("<|user|>")

    r = tf("tokenize", "--tokenizer", tokfile, "--encode", "Fair is foul")
    assert r.exit_code == 0 and r.stdout == ""
    assert "' is'" in r.stderr and "tokens for 12 bytes" in r.stderr

    r = tf("tokenize", "--tokenizer", tokfile, "--json")
    assert json.loads(r.stdout)["special_tokens"]["<|endoftext|>"] == 0


def test_tokenize_bad_input(tmp_path, play):
    assert_clean_error(tf("tokenize", "--encode", "hi"), 2, "--encode needs an existing tokenizer")
    assert_clean_error(tf("tokenize", "--out", tmp_path / "t.json"), 2, "no input files")
    assert_clean_error(tf("tokenize", play, "--vocab-size", 100, "--out", tmp_path / "t.json"), 2,
                       "vocab size 100 is out of range")
    assert_clean_error(tf("tokenize", tmp_path / "nope.txt", "--out", tmp_path / "t.json"), 2, "does not exist")
    assert_clean_error(tf("tokenize", "--tokenizer", tmp_path / "nope.json", "--encode", "x"), 2,
                       "tokenizer `", "does not exist")
    assert not (tmp_path / "t.json").exists()


def test_prepare_and_split(tmp_path, tokfile, play):
    second = tmp_path / "second.txt"
    second.write_bytes(b"\xef\xbb\xbfA second document,\r\nwith CRLF and caf\xc3\xa9.\r\n")
    corpus = tmp_path / "corpus.bin"
    r = tf("prepare", play, second, "--tokenizer", tokfile, "--out", corpus)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert "2 documents" in r.stderr and "uint16" in r.stderr and "bytes/token" in r.stderr and "MB/s" in r.stderr
    h = TokenFile.open(corpus).header
    assert h.n_documents == 2 and h.vocab_size == 512

    r = tf("prepare", play, second, "--tokenizer", tokfile, "--out", corpus, "--json")
    data = json.loads(r.stdout)
    assert data["n_tokens"] == h.n_tokens and data["path"] == str(corpus) and data["dtype"] == "uint16"

    r = tf("split", corpus, "--val-fraction", 0.1, "--seed", 0)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    train, val = TokenFile.open(tmp_path / "corpus.train.bin"), TokenFile.open(tmp_path / "corpus.val.bin")
    assert len(train) + len(val) == h.n_tokens
    assert f"{len(train):,} tokens" in r.stderr and f"{len(val):,} tokens" in r.stderr
    # two documents of very different sizes: the cut falls inside one, and the user is told
    assert "warning:" in r.stderr

    r = tf("split", corpus, "--train-out", tmp_path / "a.bin", "--val-out", tmp_path / "b.bin", "--json")
    data = json.loads(r.stdout)
    assert data["train"]["path"] == str(tmp_path / "a.bin") and data["val"]["n_tokens"] == len(val)
    assert data["inside_document"] is True


def test_split_whole_documents_without_warning(tmp_path, tokfile):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Document number {i}. " * 20}) for i in range(30)) + "\n")
    corpus = tmp_path / "docs.bin"
    assert tf("prepare", docs, "--tokenizer", tokfile, "--out", corpus).exit_code == 0
    r = tf("split", corpus, "--val-fraction", 0.2, "--json")
    assert r.exit_code == 0 and "warning" not in r.stderr
    data = json.loads(r.stdout)
    assert data["inside_document"] is False and data["n_val_documents"] == 6
    assert data["train"]["n_documents"] == 24


def test_prepare_bad_input(tmp_path, tokfile, play):
    out = tmp_path / "c.bin"
    assert_clean_error(tf("prepare", tmp_path / "missing.txt", "--tokenizer", tokfile, "--out", out), 2,
                       "missing.txt` does not exist")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"caf\xe9\n")
    assert_clean_error(tf("prepare", latin, "--tokenizer", tokfile, "--out", out), 2,
                       "latin1.txt` is not valid UTF-8 (byte offset 3", "iconv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert_clean_error(tf("prepare", bad, "--tokenizer", tokfile, "--out", out), 2, "bad.jsonl:2`: malformed JSON")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_clean_error(tf("prepare", empty, "--tokenizer", tokfile, "--out", out), 2, "empty.txt` is empty")
    notok = tmp_path / "notok.json"
    notok.write_text("{}")
    assert_clean_error(tf("prepare", play, "--tokenizer", notok, "--out", out), 2, "not a valid tokenizer file")
    assert not out.exists()


def test_split_bad_input(tmp_path):
    fake = tmp_path / "fake.bin"
    np.arange(100, dtype=np.uint16).tofile(fake)
    assert_clean_error(tf("split", fake), 2, "fake.bin` is not a tfkit token file", "tfkit prepare")
    assert_clean_error(tf("split", tmp_path / "none.bin"), 2, "none.bin` does not exist")
    assert tf("dummy-data", "--out", tmp_path / "d.bin", "--tokens", 100, "--vocab-size", 50).exit_code == 0
    assert_clean_error(tf("split", tmp_path / "d.bin", "--val-fraction", 1.5), 2, "val fraction 1.5 is not between 0 and 1")
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-2])
    assert_clean_error(tf("split", tmp_path / "trunc.bin"), 2, "truncated: header says 100 tokens but the file holds 99")


def test_dummy_data(tmp_path):
    out = tmp_path / "dummy.bin"
    r = tf("dummy-data", "--out", out, "--tokens", 5000, "--vocab-size", 300, "--seed", 3)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "" and "5,000 random tokens" in r.stderr
    first = out.read_bytes()
    r = tf("dummy-data", "--out", out, "--tokens", 5000, "--vocab-size", 300, "--seed", 3, "--json")
    data = json.loads(r.stdout)
    assert data["n_tokens"] == 5000 and data["vocab_size"] == 300 and data["tokenizer_hash"] == "none"
    assert out.read_bytes() == first
    assert_clean_error(tf("dummy-data", "--out", out, "--tokens", 0), 2, "--tokens 0 must be at least 1")


@pytest.mark.parametrize("cmd, options", [
    ("tokenize", ["--vocab-size", "--out", "--force", "--text-field", "--tokenizer", "--encode", "--json"]),
    ("prepare", ["--tokenizer", "--out", "--text-field", "--json"]),
    ("split", ["--val-fraction", "--seed", "--train-out", "--val-out", "--json"]),
    ("dummy-data", ["--out", "--tokens", "--vocab-size", "--seed", "--json"]),
])
def test_help_lists_every_option_with_an_example(cmd, options):
    r = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    assert "Examples:" in r.stdout and f"tfkit {cmd} " in r.stdout
    for opt in options:
        assert opt in r.stdout
