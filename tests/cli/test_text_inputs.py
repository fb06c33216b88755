"""Text that reaches a trained run from outside: `eval --text` streams it through a temporary token
file, and `generate --prompt` / `tokenize --encode` refuse an argument that is not UTF-8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tfkit.cli.app import app

runner = CliRunner()

PLAY = Path(__file__).resolve().parents[2].parent / "shared/corpora/shakespeare/macbeth.txt"
TINY = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=1", "model.context_length=32",
        "train.batch_size=4", "train.eval_interval=0", "train.eval_steps=1", "train.ckpt_interval=0",
        "optim.warmup_steps=1"]


def tf(*args):
    return runner.invoke(app, [str(a) for a in args])


def tfkit_subprocess(*args):
    """The real `tfkit` process, so Python itself decodes a bytes argument from argv (surrogateescape)."""
    return subprocess.run([sys.executable, "-m", "tfkit", *args], capture_output=True, text=True,
                          errors="backslashreplace")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-layer run trained for 2 steps on Macbeth (about 2 s); commands get its folder's path."""
    d = tmp_path_factory.mktemp("run")
    play = PLAY
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFKIT_HOME", str(d / "home"))
        for cmd in (["tokenize", play, "--vocab-size", 300, "--out", d / "tok.json"],
                    ["prepare", play, "--tokenizer", d / "tok.json", "--out", d / "play.bin"],
                    ["train", "--preset", "nano", *[a for s in TINY for a in ("--set", s)], "--train-data",
                     d / "play.bin", "--tokenizer", d / "tok.json", "--name", "tiny", "--max-steps", 2]):
            r = tf(*cmd)
            assert r.exit_code == 0, r.stderr
    return {"path": d / "home" / "runs" / "tiny", "tok": d / "tok.json", "bin": d / "play.bin"}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A fresh folder as `tempfile`'s temporary directory, to see what a command leaves there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_eval_text_equals_eval_on_the_same_ids(run, play, tmp_path, private_tmp):
    from tfkit.data.prepare import iter_token_chunks
    from tfkit.data.tokenfile import write_token_file
    from tfkit.data.tokenizer import Tokenizer

    r = tf("eval", run["path"], "--text", play, "--json")
    assert r.exit_code == 0, r.stderr
    text = json.loads(r.stdout)
    assert text["data"] == str(play) and text["tokens"] > 70_000
    assert list(private_tmp.iterdir()) == []  # the temporary token file is gone

    # the ids the old implementation held in memory: every chunk of the stream, concatenated
    tok = Tokenizer.load(run["tok"])
    ids = np.concatenate(list(iter_token_chunks([play], tok)))
    ref = tmp_path / "ref.bin"
    write_token_file(ref, [ids], vocab_size=tok.vocab_size, tokenizer_hash=tok.hash, eot_id=tok.eot_id,
                     source_fingerprint="test")
    for data in (ref, run["bin"]):  # and the file `tfkit prepare` made from the same play
        r = tf("eval", run["path"], "--data", data, "--json")
        assert r.exit_code == 0, r.stderr
        other = json.loads(r.stdout)
        for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "parts"):
            assert other[key] == text[key], key  # exactly: the same batches of the same ids


def test_eval_text_error_leaves_no_temporary_file(run, tmp_path, private_tmp):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"To be, or not to be.\n" * 5000 + b"\xff\n")
    r = tf("eval", run["path"], "--text", bad)
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "not valid UTF-8" in r.stderr
    assert list(private_tmp.iterdir()) == []


def test_generate_refuses_a_prompt_that_is_not_utf8(run):
    for target in (str(run["path"]), "no-such-run"):  # checked before the run is loaded
        r = tfkit_subprocess("generate", target, "--prompt", b"abc\xff", "--max-new-tokens", "2")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.splitlines()
        assert lines[0] == "error: --prompt is not valid UTF-8 text (byte 0xff at byte offset 3)"
        assert lines[1].startswith("hint: ") and "UTF-8" in lines[1]
        assert "Traceback" not in r.stderr and r.stdout == ""
    r = tf("generate", run["path"], "--prompt", "Thé", "--max-new-tokens", 2, "--seed", 1)
    assert r.exit_code == 0, r.stderr  # non-ASCII UTF-8 is fine
    assert r.stdout.startswith("Thé")


def test_tokenize_encode_refuses_text_that_is_not_utf8(run):
    r = tfkit_subprocess("tokenize", "--tokenizer", str(run["tok"]), "--encode", "é".encode() + b"\xfe!")
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[0] == "error: --encode is not valid UTF-8 text (byte 0xfe at byte offset 2)"
    assert "hint: " in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    r = tf("tokenize", "--tokenizer", run["tok"], "--encode", "é!", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_bytes"] == 3


def test_require_utf8_names_the_first_bad_character():
    from tfkit.cli.options import require_utf8
    from tfkit.errors import ConfigError

    assert require_utf8("Fair is foul ✓", "--prompt") == "Fair is foul ✓"
    bad = os.fsdecode(b"ok \xc3\xa9 \xe2\x82")  # a truncated 3-byte character, as argv decoding gives it
    with pytest.raises(ConfigError, match=r"--prompt is not valid UTF-8 text \(byte 0xe2 at byte offset 6\)") as e:
        require_utf8(bad, "--prompt")
    assert e.value.exit_code == 2 and "LANG" in e.value.hint
    with pytest.raises(ConfigError, match=r"character U\+D800 at byte offset 1"):
        require_utf8("a\ud800", "--encode")  # a lone surrogate that is not an escaped byte
