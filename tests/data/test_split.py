"""split: whole documents to validation, seeded, order kept, counts add up; single-document fallback."""

from __future__ import annotations

import numpy as np
import pytest

from tfkit.data.prepare import prepare
from tfkit.data.split import split_token_file
from tfkit.data.tokenfile import TokenFile, write_token_file
from tfkit.errors import DataError


def make_docs(path, lengths, vocab=1000):
    """Document i is (i+1) repeated lengths[i]-1 times, then EOT (0)."""
    docs = [np.concatenate([np.full(n - 1, i + 1), [0]]) for i, n in enumerate(lengths)]
    write_token_file(path, docs, vocab_size=vocab, tokenizer_hash="h", eot_id=0, source_fingerprint="src")
    return docs


def doc_ids(tokens):
    """The document numbers in a file, in order (each document is a run of its number then EOT)."""
    t = np.asarray(tokens)
    return [int(x) for x in t[np.flatnonzero(t == 0) - 1]]


def test_split_at_document_boundaries(tmp_path):
    lengths = [50, 80, 30, 120, 60, 90, 40, 70, 100, 55]
    make_docs(tmp_path / "corpus.bin", lengths)
    r = split_token_file(tmp_path / "corpus.bin", val_fraction=0.2, seed=3)
    assert r.train_path == tmp_path / "corpus.train.bin" and r.val_path == tmp_path / "corpus.val.bin"
    assert not r.inside_document
    train, val = TokenFile.open(r.train_path), TokenFile.open(r.val_path)
    assert train.header == r.train_header and val.header == r.val_header
    tr, va = doc_ids(train.tokens), doc_ids(val.tokens)
    assert sorted(tr + va) == list(range(1, 11))  # every document exactly once
    assert tr == sorted(tr) and va == sorted(va)  # original order kept
    for d in va:  # whole documents, intact
        assert np.count_nonzero(np.asarray(val.tokens) == d) == lengths[d - 1] - 1
    n = sum(lengths)
    assert len(train) + len(val) == n
    assert len(val) >= 0.2 * n
    assert len(val) - min(lengths[d - 1] for d in va) < 0.2 * n  # minimal: one document fewer is too few
    assert r.n_val_documents == len(va) == val.header.n_documents
    assert train.header.n_documents == len(tr)
    h = val.header
    assert (h.vocab_size, h.tokenizer_hash, h.eot_id, h.source_fingerprint) == (1000, "h", 0, "split:src")


def test_seed_changes_the_choice_and_is_reproducible(tmp_path):
    make_docs(tmp_path / "c.bin", [20] * 40)
    picks = []
    for seed in (0, 0, 1):
        r = split_token_file(tmp_path / "c.bin", 0.1, seed=seed, train_out=tmp_path / f"t{seed}.bin",
                             val_out=tmp_path / f"v{seed}.bin")
        picks.append(doc_ids(TokenFile.open(r.val_path).tokens))
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert len(picks[0]) == 4


def test_single_document_is_split_inside(tmp_path, tok, play):
    prepare([play], tok, tmp_path / "play.bin")
    n = len(TokenFile.open(tmp_path / "play.bin"))
    r = split_token_file(tmp_path / "play.bin", 0.1, tokenizer=tok)
    assert r.inside_document and r.n_val_documents == 1
    train, val = TokenFile.open(r.train_path).tokens, TokenFile.open(r.val_path).tokens
    assert len(train) + len(val) == n
    assert abs(len(val) - 0.1 * n) < 0.02 * n
    assert tok.decode(train).endswith("\n")  # cut just after a newline token
    assert tok.decode(train) + tok.decode(val) == play.read_text() + "<|endoftext|>"
    assert r.train_header.n_bytes + r.val_header.n_bytes == play.stat().st_size


def test_dominant_document_falls_back_inside(tmp_path):
    make_docs(tmp_path / "c.bin", [1000, 10])
    r = split_token_file(tmp_path / "c.bin", 0.5, seed=0)
    # whole documents give val 99% or 1% of the tokens: cut inside instead
    assert r.inside_document
    assert len(TokenFile.open(r.val_path)) == 505


@pytest.mark.parametrize("seed", range(5))
def test_a_huge_document_is_not_taken_for_validation(tmp_path, seed):
    make_docs(tmp_path / "c.bin", [1000] + [10] * 30)
    r = split_token_file(tmp_path / "c.bin", 0.1, seed=seed)
    va = doc_ids(TokenFile.open(r.val_path).tokens)
    assert not r.inside_document and 1 not in va and len(va) == 13  # 130 tokens = 10% of 1300


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_bad_fraction(tmp_path, fraction):
    make_docs(tmp_path / "c.bin", [10, 10])
    with pytest.raises(DataError, match="not between 0 and 1") as e:
        split_token_file(tmp_path / "c.bin", fraction)
    assert "--val-fraction" in e.value.hint


def test_outputs_must_differ_from_input(tmp_path):
    make_docs(tmp_path / "c.bin", [10, 10])
    with pytest.raises(DataError, match="must differ"):
        split_token_file(tmp_path / "c.bin", 0.5, train_out=tmp_path / "c.bin")


def test_tokenizer_must_match(tmp_path, tok):
    make_docs(tmp_path / "c.bin", [10, 10])
    with pytest.raises(DataError, match="did not make"):
        split_token_file(tmp_path / "c.bin", 0.5, tokenizer=tok)
