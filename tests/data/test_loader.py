"""Batch loader: deterministic, exact resume (across epochs, twice), eval coverage, hold-out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tfkit.data.loader import BatchLoader, eval_batches, hold_out
from tfkit.errors import CheckpointError, DataError

TOKENS = np.arange(1000, dtype=np.uint16)  # token value == position: windows are easy to read


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_batches_are_shifted_windows_on_the_grid():
    loader = BatchLoader(TOKENS, batch_size=4, context_length=16, seed=0)
    seen_starts = []
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows
        assert int(y.max()) < 1000
        seen_starts += x[:, 0].tolist()
    epoch0 = loader.windows_in_epoch(0)
    first = seen_starts[:epoch0]
    assert len(set(first)) == epoch0  # an epoch visits each window once
    assert len({s % 16 for s in first}) == 1  # on one grid (one offset per epoch)


def test_deterministic_by_seed():
    a = batches(BatchLoader(TOKENS, 4, 16, seed=1), 5)
    b = batches(BatchLoader(TOKENS, 4, 16, seed=1), 5)
    c = batches(BatchLoader(TOKENS, 4, 16, seed=2), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_epochs_differ_in_offset_or_order():
    loader = BatchLoader(TOKENS, 1, 16, seed=0)
    n0 = loader.windows_in_epoch(0)
    e0 = [int(loader.next_batch()[0][0, 0]) for _ in range(n0)]
    n1 = loader.windows_in_epoch(1)
    e1 = [int(loader.next_batch()[0][0, 0]) for _ in range(n1)]
    assert loader.state_dict() == {"epoch": 2, "index": 0}
    assert e0 != e1


@pytest.mark.parametrize("stop", [3, 7, 15])
def test_resume_is_exact_across_an_epoch_boundary_and_twice(stop):
    # 1000 tokens, T=16 → ~61 windows per epoch; B=8 → an epoch ends inside batch 8
    ref = batches(BatchLoader(TOKENS, 8, 16, seed=5), 30)
    first = BatchLoader(TOKENS, 8, 16, seed=5)
    got = batches(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-safe
    second = BatchLoader(TOKENS, 8, 16, seed=5)
    second.load_state_dict(state)
    got += batches(second, 10)
    third = BatchLoader(TOKENS, 8, 16, seed=5)
    third.load_state_dict(second.state_dict())
    got += batches(third, 30 - stop - 10)
    assert len(got) == len(ref)
    for (x, y), (rx, ry) in zip(got, ref):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert third.state_dict()["epoch"] >= 2  # the run crossed epoch boundaries


def test_fewer_windows_than_batch_size_repeats_windows():
    tokens = np.arange(40, dtype=np.uint32)
    loader = BatchLoader(tokens, batch_size=16, context_length=8, seed=0)
    x, y = loader.next_batch()
    assert x.shape == (16, 8) and torch.equal(y[:, :-1], x[:, 1:])
    assert loader.state_dict()["epoch"] >= 3
    again = BatchLoader(tokens, batch_size=16, context_length=8, seed=0).next_batch()
    assert torch.equal(again[0], x)


def test_exactly_context_plus_one_tokens():
    x, y = BatchLoader(np.arange(9, dtype=np.uint16), 2, 8).next_batch()
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2


def test_too_few_tokens():
    with pytest.raises(DataError, match=r"has 8 tokens, fewer than context_length\+1 = 9; lower model.context_length"):
        BatchLoader(np.arange(8, dtype=np.uint16), 2, 8)
    with pytest.raises(DataError, match=r"`v.bin` has 3 tokens, fewer than context_length\+1 = 9"):
        next(eval_batches(np.arange(3, dtype=np.uint16), 2, 8, name="`v.bin`"))


def test_bad_state_is_refused():
    loader = BatchLoader(TOKENS, 4, 16)
    for bad in ({}, {"epoch": 0}, {"epoch": "0", "index": 0}, {"epoch": 0, "index": 10_000}, {"epoch": -1, "index": 0}):
        with pytest.raises(CheckpointError):
            loader.load_state_dict(bad)


def test_eval_batches_cover_the_array_in_order():
    tokens = np.arange(1000, dtype=np.uint16)
    out = list(eval_batches(tokens, batch_size=8, context_length=16))
    xs = torch.cat([x for x, _ in out])
    ys = torch.cat([y for _, y in out])
    k = (1000 - 1) // 16
    assert xs.shape == (k, 16) and [x.shape[0] for x, _ in out] == [8] * (k // 8) + [k % 8]  # last batch partial
    assert xs.flatten().tolist() == list(range(k * 16))  # non-overlapping, in order, no gaps
    assert ys.flatten().tolist() == list(range(1, k * 16 + 1))
    again = list(eval_batches(tokens, 8, 16))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, again))


def test_eval_batches_limited_spread_over_the_array():
    tokens = np.arange(10_000, dtype=np.uint16)
    out = list(eval_batches(tokens, batch_size=4, context_length=10, max_batches=3))
    assert len(out) == 3 and all(x.shape == (4, 10) for x, _ in out)
    starts = torch.cat([x[:, 0] for x, _ in out]).tolist()
    assert starts == sorted(starts) and len(set(starts)) == 12
    assert all(s % 10 == 0 for s in starts)
    assert starts[0] == 0 and starts[-1] >= 9_980  # spread to the end, not the first 120 tokens
    assert len(list(eval_batches(tokens[:45], 4, 10, max_batches=3))) == 1  # fewer windows than the cap


def test_hold_out_views():
    tokens = np.arange(100, dtype=np.uint16)
    train, val = hold_out(tokens, 0.1)
    assert len(train) == 90 and len(val) == 10 and int(val[0]) == 90
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    assert [len(v) for v in hold_out(tokens[:3], 0.01)] == [2, 1]
    with pytest.raises(DataError, match="not between 0 and 1"):
        hold_out(tokens, 1.0)


def test_the_prefetcher_gives_the_loaders_batches_and_the_loops_position():
    from tfkit.data.loader import Prefetcher

    tokens = np.arange(3_000, dtype=np.uint16)
    plain = BatchLoader(tokens, 4, 16, seed=3)
    ahead = Prefetcher(BatchLoader(tokens, 4, 16, seed=3), rank=1, world_size=2)
    for _ in range(5):
        x, y = ahead.next_batch()
        want = plain.next_batch(1, 2)
        assert torch.equal(x, want[0]) and torch.equal(y, want[1])
    # one batch is drawn ahead, yet the state is the loop's: a loader restored from it continues alike
    state = ahead.state_dict()
    assert state == plain.state_dict()
    restored = BatchLoader(tokens, 4, 16, seed=3)
    restored.load_state_dict(state)
    assert torch.equal(restored.next_batch(1, 2)[0], ahead.next_batch()[0])
    ahead.load_state_dict(state)  # going back drops the batch drawn ahead
    assert torch.equal(ahead.next_batch()[0], plain.next_batch(1, 2)[0])
    ahead.close()
