"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules.

AdamW: Loshchilov & Hutter, arXiv 1711.05101 (decoupled weight decay), PyTorch's implementation.
Cosine decay with warmup: Loshchilov & Hutter, arXiv 1608.03983 (SGDR, also the restarts variant).
"""

from __future__ import annotations

import math

import torch

from tfkit.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices: ndim >= 2) and a no-decay group
    (norm gains, biases, scalars). Tied parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """PyTorch AdamW over :func:`param_groups` (fused kernel on CUDA)."""
    kwargs = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kwargs)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from 0 (lr(0) = 0) to ``cfg.lr`` at ``warmup_steps``; then ``constant``,
    ``cosine`` (reaching ``min_lr`` at ``total_steps`` and staying there) or ``cosine_restarts``
    (``cfg.restarts`` equal cosine cycles, each from ``lr`` down to ``min_lr``).
    """
    w = cfg.warmup_steps
    if w and step < w:
        return cfg.lr * step / w
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - w)
    progress = min(1.0, (step - w) / span)
    if cfg.schedule == "cosine_restarts":
        cycle = span / cfg.restarts
        progress = 1.0 if step >= total_steps else ((step - w) % cycle) / cycle
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
