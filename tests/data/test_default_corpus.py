"""The bundled Shakespeare: reproducible asset, cached tokenizer/token files, whole works in val."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tfkit.data.default_corpus as dc
from tfkit import paths
from tfkit.data.tokenfile import TokenFile
from tfkit.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_asset_is_the_42_works_and_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_default_corpus", ROOT / "tools" / "make_default_corpus.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    summary = tool.build(tool.DEFAULT_SRC, tmp_path / "again.jsonl.gz")
    assert summary["works"] == 42
    assert (tmp_path / "again.jsonl.gz").read_bytes() == paths.default_corpus().read_bytes()
    with gzip.open(paths.default_corpus(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [r["title"] for r in rows] == sorted(p.stem for p in tool.DEFAULT_SRC.glob("*.txt"))
    assert rows[[r["title"] for r in rows].index("macbeth")]["text"] == (tool.DEFAULT_SRC / "macbeth.txt").read_text()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One first call (vocab 512), shared by the tests below: (home, result, status lines, progress calls)."""
    home = tmp_path_factory.mktemp("default_home")
    status: list[str] = []
    progress: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFKIT_HOME", str(home))
        d = dc.ensure_default_data(vocab_size=512, val_fraction=0.1, seed=0, on_status=status.append,
                                   on_progress=progress.append)
    return home, d, status, progress


def test_first_call_builds_whole_works_split(built):
    home, d, status, progress = built
    assert d.train.parent.parent == home / "cache" / "default"
    assert [p.name for p in (d.tokenizer, d.train, d.val)] == ["tokenizer.json", "corpus.train.bin", "corpus.val.bin"]
    assert len(status) == 3 and "tokenizer" in status[0]
    assert sum(progress) == paths.default_corpus().stat().st_size
    tok = Tokenizer.load(d.tokenizer)
    train, val = TokenFile.open(d.train), TokenFile.open(d.val)
    assert tok.vocab_size == 512 == train.header.vocab_size
    assert train.header.tokenizer_hash == val.header.tokenizer_hash == tok.hash
    # validation is whole works: every val document starts at a work's first line and ends with EOT
    texts = [json.loads(line)["text"] for line in gzip.open(paths.default_corpus(), "rt", encoding="utf-8")]
    titles = {t.split("\n", 1)[0] for t in texts}
    v = np.asarray(val.tokens)
    assert int(v[-1]) == tok.eot_id
    starts = np.concatenate(([0], np.flatnonzero(v == tok.eot_id)[:-1] + 1))
    assert len(starts) == val.header.n_documents >= 2
    for s in starts:
        assert tok.decode(v[s:s + 40]).split("\n", 1)[0] in titles
    total = len(train) + len(val)
    assert 0.1 <= len(val) / total < 0.2
    assert train.header.n_documents + val.header.n_documents == 42
    assert train.header.n_bytes + val.header.n_bytes == sum(len(t.encode()) for t in texts)


def test_second_call_reuses_the_cache(built, monkeypatch):
    home, d, _, _ = built
    monkeypatch.setenv("TFKIT_HOME", str(home))
    mtimes = [p.stat().st_mtime_ns for p in (d.tokenizer, d.train, d.val)]
    status: list[str] = []
    again = dc.ensure_default_data(vocab_size=512, val_fraction=0.1, seed=0, on_status=status.append)
    assert again == d and status == []  # cache hit: nothing rebuilt
    assert [p.stat().st_mtime_ns for p in (d.tokenizer, d.train, d.val)] == mtimes
    other = dc.cache_key(paths.default_corpus(), 512, 0.2, 0)
    assert other != d.train.parent.name  # another fraction → another cache folder


def test_interrupted_first_run_leaves_no_half_files(built, monkeypatch):
    import tfkit.data.prepare as prepare_mod

    _, d, _, _ = built
    folder = paths.cache_dir() / "default" / d.train.parent.name
    folder.mkdir(parents=True)
    shutil.copy(d.tokenizer, folder / "tokenizer.json")  # as if the tokenizer step had finished

    def interrupted(*args, **kwargs):  # Ctrl-C in the middle of encoding
        yield np.array([5, 6, 7])
        raise KeyboardInterrupt

    real = prepare_mod.encode_documents
    monkeypatch.setattr(prepare_mod, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dc.ensure_default_data(vocab_size=512)
    assert [p.name for p in folder.iterdir()] == ["tokenizer.json"]  # no partial corpus.bin or temp file
    monkeypatch.setattr(prepare_mod, "encode_documents", real)
    status: list[str] = []
    again = dc.ensure_default_data(vocab_size=512, on_status=status.append)
    assert len(status) == 2 and "tokenizer" not in status[0]  # the finished tokenizer was reused
    assert again.train.read_bytes() == d.train.read_bytes()  # and the result is the same as uninterrupted


def test_corrupt_cache_is_rebuilt(built):
    _, d, _, _ = built
    shutil.copytree(d.train.parent, paths.cache_dir() / "default" / d.train.parent.name)
    mine = dc.ensure_default_data(vocab_size=512)
    assert mine.val.stat().st_size == d.val.stat().st_size
    mine.val.write_bytes(mine.val.read_bytes()[:5000])  # truncated
    status: list[str] = []
    again = dc.ensure_default_data(vocab_size=512, on_status=status.append)
    assert again == mine and len(status) == 1 and "splitting" in status[0]
    assert again.val.read_bytes() == d.val.read_bytes()
