"""Validation: loss (nats/token), perplexity and bits per byte of a model on token windows.

Bits per byte (as in nanochat / the Pile paper, arXiv 2101.00027): the summed cross-entropy of the
targets that stand for text, divided by ln 2 times the UTF-8 bytes those targets stand for.
Special tokens (end-of-text, chat roles) stand for no bytes and are left out of that ratio.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from tfkit.hardware import Runtime


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple], runtime: Runtime,
             byte_lengths: Optional[torch.Tensor] = None,
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Mean validation metrics over ``batches`` of ``(x, y)`` int64 tensors of shape (B, T).

    Args:
        runtime: the device and precision (autocast) to evaluate in.
        batches: ``(x, y)`` or ``(x, y, counted)``; a batch with ``counted`` False runs the forward
            but adds nothing (it keeps ranks in step when they hold different numbers of batches).
        byte_lengths: (V,) int tensor, UTF-8 bytes each token id stands for; ``None`` = no bpb.
        reduce: sums a float64 tensor of this process's totals over processes, in place (the
            ranks of a distributed run each evaluate a share); ``None`` = one process.

    The loss per position is the cross-entropy of the logits, plus the model's ``extra_nats``
    when it reports them (the Free Transformer's KL, making the figure an upper bound on the NLL).

    Returns:
        dict with ``loss`` (nats/token), ``perplexity``, ``bits_per_byte`` (or None), ``tokens``,
        ``bytes``, and the batch-averaged ``parts`` and ``stats`` of the model's output.

    Raises:
        ValueError: ``batches`` is empty.
    """
    device = runtime.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # nll, tokens, text nll, bytes, batches
    parts: dict[str, torch.Tensor] = {}
    stats: dict[str, torch.Tensor] = {}
    if byte_lengths is not None:
        byte_lengths = byte_lengths.to(device)
    try:
        for x, y, *counted in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with runtime.autocast:
                out = model(x, targets=y)
            if counted and not counted[0]:
                continue
            nll = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=-1)
            if out.extra_nats is not None:  # a latent-variable bound: CE + KL per position
                nll = nll + out.extra_nats.float().flatten()
            valid = y.flatten() >= 0
            sums[0] += nll[valid].sum().double()
            sums[1] += valid.sum()
            if byte_lengths is not None:
                nbytes = byte_lengths[y.flatten().clamp(min=0)] * valid
                sums[2] += nll[nbytes > 0].sum().double()
                sums[3] += nbytes.sum()
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0.0) + torch.as_tensor(v, device=device).double()
            for k, v in out.stats.items():
                stats[k] = stats.get(k, 0.0) + torch.as_tensor(v, device=device).double()
            sums[4] += 1
    finally:
        model.train(was_training)
    flat = torch.cat([sums, torch.stack([*parts.values(), *stats.values()]) if parts or stats
                      else sums.new_zeros(0)])
    if reduce is not None:
        reduce(flat)
    values = flat.tolist()  # one host sync for the whole evaluation
    total_nll, total_tokens, text_nll, total_bytes, n_batches = values[:5]
    if not n_batches or not total_tokens:
        raise ValueError("no validation tokens to evaluate")
    loss = total_nll / total_tokens
    bpb = text_nll / (math.log(2) * total_bytes) if total_bytes else None
    rest = values[5:]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bpb, "tokens": int(total_tokens),
            "bytes": int(total_bytes), "parts": {k: v / n_batches for k, v in zip(parts, rest)},
            "stats": {k: v / n_batches for k, v in zip(stats, rest[len(parts):])}}
