"""Batches for training and evaluation from a 1-D token array (usually a token file's memmap).

Training (:class:`BatchLoader`) samples non-overlapping windows of ``context_length + 1`` tokens
with stride ``context_length``; epoch ``e`` shifts the window grid by a random offset in
``[0, context_length)`` and visits the windows in a random order, both drawn from
``np.random.default_rng([seed, e])``. The whole position is two integers (``epoch``, ``index``),
so resuming from :meth:`BatchLoader.state_dict` reproduces the uninterrupted batches exactly.

torch is imported only inside the functions that build tensors.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np

from tfkit.errors import CheckpointError, DataError


def _pair(tokens: np.ndarray, idx: np.ndarray, mask: Any = None):
    """Inputs and targets of windows ``idx`` (B, T+1): x = w[:, :-1], y = w[:, 1:], with y = -1 where
    ``mask`` says the loss does not count the target. Two (B, T) int64 CPU tensors."""
    import torch

    windows = np.asarray(tokens[idx]).astype(np.int64)  # (B, T+1)
    y = np.ascontiguousarray(windows[:, 1:])  # (B, T)
    if mask is not None:
        y[~mask.at(idx[:, 1:])] = -1
    return torch.from_numpy(np.ascontiguousarray(windows[:, :-1])), torch.from_numpy(y)


def _check_tokens(tokens: np.ndarray, context_length: int, name: str) -> int:
    if getattr(tokens, "ndim", 1) != 1:
        raise DataError(f"{name} must be a 1-D token array, got shape {tuple(tokens.shape)}", "pass a token file's tokens")
    if context_length < 1:
        raise DataError(f"context_length {context_length} must be at least 1", "set `model.context_length` ≥ 1")
    n = len(tokens)
    need = context_length + 1
    if n < need:
        raise DataError(f"{name} has {n} tokens, fewer than context_length+1 = {need}; "
                        "lower model.context_length or use more data",
                        f"pass e.g. `--set model.context_length={max(1, n - 1)}` or prepare more text")
    return n


class BatchLoader:
    """Deterministic, resumable sampler of (input, target) training batches.

    Args:
        tokens: 1-D array of ids (any unsigned or signed integer dtype; a memmap stays on disk).
        batch_size: sequences per batch (B).
        context_length: tokens per sequence (T); each window holds T+1 tokens.
        seed: non-negative sampling seed.
        name: how errors name the data (e.g. the file path in backticks).
        mask: a :class:`~tfkit.data.tokenfile.LossMask` of ``tokens``: targets the loss does not
            count (the non-assistant tokens of conversations) become -1. None = every target counts.

    Batches continue across epoch boundaries without a gap; when there are fewer windows than
    ``batch_size`` a batch simply spans several epochs (windows repeat, still deterministic).

    Raises:
        DataError: fewer than ``context_length + 1`` tokens, bad sizes, a negative seed.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int = 0,
                 name: str = "the training data", mask: Any = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} must be at least 1", "set `train.batch_size` ≥ 1")
        if seed < 0:
            raise DataError(f"seed {seed} must be non-negative", "set `system.seed` ≥ 0")
        self.n_tokens = _check_tokens(tokens, context_length, name)
        self.tokens = tokens
        self.mask = mask
        self.batch_size = int(batch_size)
        self.context_length = int(context_length)
        self.seed = int(seed)
        self.epoch = 0
        self.index = 0
        self._plan_epoch = -1
        self._offset = 0
        self._perm = np.zeros(0, dtype=np.int64)

    def _plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """Offset and window order of ``epoch`` (cached for the current one)."""
        if epoch != self._plan_epoch:
            t, n = self.context_length, self.n_tokens
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, min(t, n - t - 1) + 1))  # every offset leaves ≥ 1 window
            n_windows = (n - 1 - offset) // t
            self._offset, self._perm, self._plan_epoch = offset, rng.permutation(n_windows), epoch
        return self._offset, self._perm

    def windows_in_epoch(self, epoch: Optional[int] = None) -> int:
        """Number of windows (sequences) in ``epoch`` (default: the current one)."""
        return len(self._plan(self.epoch if epoch is None else epoch)[1])

    def _next_starts(self) -> np.ndarray:
        starts = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            offset, perm = self._plan(self.epoch)
            take = min(self.batch_size - filled, len(perm) - self.index)
            starts[filled:filled + take] = offset + perm[self.index:self.index + take] * self.context_length
            filled += take
            self.index += take
            if self.index >= len(perm):
                self.epoch += 1
                self.index = 0
        return starts

    def next_batch(self, rank: int = 0, world_size: int = 1):
        """The next batch ``(x, y)``: int64 CPU tensors of shape ``(B, T)``.

        Each row comes from a window ``w`` of T+1 tokens: ``x = w[:-1]``, ``y = w[1:]`` (the targets
        are the inputs shifted left by one token).

        With ``world_size`` N > 1, every rank walks the same stream of batches and takes the
        ``rank``-th of each N consecutive ones (the others are skipped without reading tokens):
        the ranks' batches are disjoint and together are the batches one process would see.
        """
        for _ in range(rank):
            self._next_starts()
        starts = self._next_starts()
        for _ in range(world_size - 1 - rank):
            self._next_starts()
        idx = starts[:, None] + np.arange(self.context_length + 1, dtype=np.int64)  # (B, T+1)
        return _pair(self.tokens, idx, self.mask)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The position, JSON-safe: ``{"epoch": int, "index": int}`` (index within the epoch's order)."""
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (same tokens, batch size, context, seed).

        Raises:
            CheckpointError: missing keys, non-integer values, or an index beyond the epoch.
        """
        try:
            epoch, index = state["epoch"], state["index"]
        except (KeyError, TypeError):
            raise CheckpointError(f"data loader state {state!r} lacks `epoch` and `index`",
                                  "the checkpoint is incomplete; resume from an earlier one") from None
        if isinstance(epoch, bool) or isinstance(index, bool) or not isinstance(epoch, int) or not isinstance(index, int):
            raise CheckpointError(f"data loader state {state!r} must hold integers", "the checkpoint is corrupt")
        if epoch < 0 or not 0 <= index <= self.windows_in_epoch(epoch):
            raise CheckpointError(f"data loader state {state!r} is out of range for this data "
                                  f"({self.windows_in_epoch(max(epoch, 0))} windows per epoch)",
                                  "resume with the same data, batch size and context length as the run")
        self.epoch, self.index = epoch, index
        if self.index == self.windows_in_epoch(epoch):
            self.epoch, self.index = epoch + 1, 0


class Prefetcher:
    """Draws the next training batch of a :class:`BatchLoader` in a background thread while the
    current step runs, in pinned (page-locked) memory when the batches go to a CUDA device, so
    the copy to the device can be non-blocking.

    The batches, and their order, are exactly the loader's; :meth:`state_dict` is the position
    before the batch drawn ahead (the one the loop has not taken yet), so a checkpoint resumes at
    the batch the loop would have taken next.

    Args:
        loader: the batch source.
        rank, world_size: passed to :meth:`BatchLoader.next_batch`.
        pin: pin the host tensors (only for CUDA).
    """

    def __init__(self, loader: BatchLoader, rank: int = 0, world_size: int = 1, pin: bool = False) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.loader, self.rank, self.world_size, self.pin = loader, rank, world_size, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfkit-batches")
        self._ahead = None  # (loader state before the batch, future of the batch)
        self._draw_ahead()

    def _draw(self):
        x, y = self.loader.next_batch(self.rank, self.world_size)
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def _draw_ahead(self) -> None:
        self._ahead = (self.loader.state_dict(), self._pool.submit(self._draw))

    def next_batch(self):
        """The next batch ``(x, y)`` (as :meth:`BatchLoader.next_batch`), and start drawing the one after."""
        _, future = self._ahead
        batch = future.result()
        self._draw_ahead()
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position before the batch drawn ahead: the loop's position."""
        self._ahead[1].result()  # the draw must not move the loader while its state is read back
        return dict(self._ahead[0])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move to ``state`` (a :meth:`BatchLoader.state_dict`), dropping the batch drawn ahead."""
        self._ahead[1].result()
        self.loader.load_state_dict(state)
        self._draw_ahead()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def eval_batches(tokens: np.ndarray, batch_size: int, context_length: int, max_batches: Optional[int] = None,
                 name: str = "the validation data", mask: Any = None) -> Iterator[tuple[Any, Any]]:
    """Deterministic evaluation batches over non-overlapping windows, in order.

    Windows of T+1 tokens start at ``0, T, 2T, …`` and cover ``tokens[: 1 + K·T]`` where
    ``K = (N - 1) // T`` (the last ``< T`` tokens are left out). With ``max_batches`` smaller than
    needed, ``max_batches · batch_size`` windows are picked evenly spread over the whole array.
    The last batch may hold fewer than ``batch_size`` rows. With ``mask`` (a
    :class:`~tfkit.data.tokenfile.LossMask`), targets the loss does not count are -1.

    Yields:
        ``(x, y)`` int64 CPU tensors of shape ``(b, T)`` with ``b ≤ batch_size``.

    Raises:
        DataError: fewer than ``context_length + 1`` tokens, or ``batch_size``/``max_batches`` < 1.
    """
    if batch_size < 1:
        raise DataError(f"batch_size {batch_size} must be at least 1", "set `train.batch_size` ≥ 1")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches {max_batches} must be at least 1", "set `train.eval_steps` ≥ 1")
    n = _check_tokens(tokens, context_length, name)
    t = context_length
    k = (n - 1) // t
    m = k if max_batches is None else min(k, max_batches * batch_size)
    if m < k:
        chosen = np.unique(np.linspace(0, k - 1, m).round().astype(np.int64))
    else:
        chosen = np.arange(k, dtype=np.int64)
    offs = np.arange(t + 1, dtype=np.int64)
    for b in range(0, len(chosen), batch_size):
        idx = chosen[b:b + batch_size, None] * t + offs  # (b, T+1)
        yield _pair(tokens, idx, mask)


def count_eval_batches(n_tokens: int, batch_size: int, context_length: int, max_batches: Optional[int] = None) -> int:
    """How many batches :func:`eval_batches` yields for these sizes (0 if too short)."""
    k = max(0, (n_tokens - 1) // context_length) if context_length >= 1 else 0
    m = k if max_batches is None else min(k, max_batches * batch_size)
    return math.ceil(m / batch_size) if batch_size >= 1 else 0


def hold_out(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split off the last ``val_fraction`` of a token array as validation; both are views (no copy).

    Returns:
        ``(train, val)``: ``tokens[:N-v]`` and ``tokens[N-v:]`` with ``v = round(N·f)`` clamped to
        ``[1, N-1]``.

    Raises:
        DataError: fraction not in (0, 1), or fewer than 2 tokens.
    """
    f = float(val_fraction)
    if not (math.isfinite(f) and 0.0 < f < 1.0):
        raise DataError(f"val fraction {val_fraction} is not between 0 and 1 (exclusive)",
                        "set `data.val_fraction` to e.g. 0.05")
    n = len(tokens)
    if n < 2:
        raise DataError(f"cannot hold out validation tokens from {n} token(s)", "use more data")
    v = min(max(int(round(n * f)), 1), n - 1)
    return tokens[: n - v], tokens[n - v:]
