"""dummy-data: uniform random ids in the real format, reproducible by seed."""

from __future__ import annotations

import numpy as np
import pytest

from tfkit.data.dummy import make_dummy
from tfkit.data.tokenfile import TokenFile
from tfkit.errors import DataError


def test_dummy_header_and_range(tmp_path):
    h = make_dummy(tmp_path / "d.bin", 3_000_000, 300, seed=7)  # > one 2^20 chunk
    tf = TokenFile.open(tmp_path / "d.bin")
    assert tf.header == h
    assert (h.n_tokens, h.vocab_size, h.dtype, h.tokenizer_hash, h.eot_id, h.source_fingerprint, h.n_bytes) == \
        (3_000_000, 300, "uint16", "none", 0, "dummy", 0)
    counts = np.bincount(tf.tokens, minlength=300)
    assert counts.min() > 0.9 * 10_000 and counts.max() < 1.1 * 10_000  # uniform over [0, 300)
    tf.check_ids(300)


def test_dummy_is_deterministic_by_seed(tmp_path):
    make_dummy(tmp_path / "a.bin", 5000, 70_000, seed=1)
    make_dummy(tmp_path / "b.bin", 5000, 70_000, seed=1)
    make_dummy(tmp_path / "c.bin", 5000, 70_000, seed=2)
    a, b, c = (TokenFile.open(tmp_path / f"{n}.bin") for n in "abc")
    assert a.header.dtype == "uint32" and int(a.tokens.max()) >= 65536
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("n, v, match", [(0, 10, "--tokens 0"), (10, 1, "--vocab-size 1")])
def test_dummy_bad_arguments(tmp_path, n, v, match):
    with pytest.raises(DataError, match=match):
        make_dummy(tmp_path / "d.bin", n, v)
    assert not (tmp_path / "d.bin").exists()
