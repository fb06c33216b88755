"""Learning-rate schedules and AdamW parameter groups (architectures.md §1 invariant 6)."""

import math

import pytest
import torch

from tfkit.config import OptimConfig
from tfkit.train.optim import lr_at, param_groups


def test_cosine_warmup_endpoints():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 100) == 0.0
    assert lr_at(5, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(10, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(55, cfg, 100) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 100) == pytest.approx(1e-4)


def test_constant_and_restarts():
    const = OptimConfig(lr=1e-3, min_lr=0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, const, 50) for s in (2, 4, 49)] == [pytest.approx(5e-4), 1e-3, 1e-3]
    rs = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="cosine_restarts", restarts=2)
    assert lr_at(0, rs, 100) == pytest.approx(1.0)
    assert lr_at(49, rs, 100) < 0.01
    assert lr_at(50, rs, 100) == pytest.approx(1.0)  # second cycle restarts at the peak
    assert lr_at(100, rs, 100) == pytest.approx(0.0)


def test_param_groups_split_matrices_from_gains():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3  # linear bias, norm weight, norm bias


def test_clipping_bounds_norm_and_keeps_small_gradients():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    norm = torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([0.3, 0.4, 0.0])
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert torch.equal(p.grad, torch.tensor([0.3, 0.4, 0.0]))
    assert math.isclose(float(p.grad.norm()), 0.5, rel_tol=1e-6)
