"""Sampling rules (temperature, top-k, top-p) and streaming generation with and without a KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from tfkit.config import ModelConfig
from tfkit.models import build_model
from tfkit.train.sample import generate, sample_next


def tiny_model(seed: int = 0, **kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context_length=32)
    base.update(kw)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**base))


def peaked_model(seed: int = 0):
    """A random model with a larger init, so greedy paths are not decided by near-ties."""
    return tiny_model(seed=seed, init_std=0.5)


def rand_logits(b: int = 4, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# -- sample_next ----------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = rand_logits()
    out = sample_next(logits, temperature=0)
    assert out.dtype == torch.int64 and out.shape == (4,)
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_equals_greedy():
    logits = rand_logits()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=gen), logits.argmax(-1))


def test_tiny_top_p_equals_greedy():
    logits = rand_logits()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, 1.5, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_top_k_only_draws_from_the_k_largest():
    logits = rand_logits(b=1, v=30)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 2.0, top_k=5, generator=gen)) for _ in range(400)}
    assert draws <= allowed and len(draws) > 1


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    for p, allowed in ((0.5, {1}), (0.8, {1, 3}), (0.81, {1, 3, 2}), (1.0, {0, 1, 2, 3})):
        draws = {int(sample_next(logits, 1.0, top_p=p, generator=gen)) for _ in range(400)}
        assert draws == allowed, (p, draws)


def test_sampling_is_reproducible_with_a_generator():
    logits = rand_logits(b=8)
    a = sample_next(logits, 1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_bad_sampling_settings_raise_naming_the_field(kwargs, field):
    args = dict(temperature=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        sample_next(rand_logits(), **args)
    with pytest.raises(ValueError, match=field):
        generate(tiny_model(), [1, 2], max_new_tokens=3, **args)


# -- generate -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len,new", [(1, 31), (5, 20), (20, 12)])
def test_cached_and_uncached_greedy_generation_agree(prompt_len, new):
    model = peaked_model()
    prompt = list(range(3, 3 + prompt_len))
    cached = list(generate(model, prompt, new, temperature=0, use_cache=True))
    plain = list(generate(model, prompt, new, temperature=0, use_cache=False))
    assert len(cached) == new and cached == plain


def test_generate_streams_and_restores_mode_without_leaking_inference_mode():
    model = peaked_model()
    model.train()
    stream = generate(model, torch.tensor([4, 5, 6]), 5, temperature=0)
    first = next(stream)
    assert isinstance(first, int) and 0 <= first < 64
    assert not model.training and not torch.is_inference_mode_enabled()
    rest = list(stream)
    assert len(rest) == 4 and model.training


def test_generate_top_k_one_equals_greedy():
    model = peaked_model()
    greedy = list(generate(model, [1, 2, 3], 10, temperature=0))
    assert list(generate(model, [1, 2, 3], 10, temperature=1.0, top_k=1, seed=5)) == greedy


def test_same_seed_same_tokens_different_seed_different_tokens():
    model = tiny_model()
    a = list(generate(model, [1, 2, 3], 24, temperature=1.0, seed=11))
    b = list(generate(model, [1, 2, 3], 24, temperature=1.0, seed=11))
    c = list(generate(model, [1, 2, 3], 24, temperature=1.0, seed=12))
    assert a == b and a != c
    assert list(generate(model, [1, 2, 3], 24, temperature=1.0, seed=11, use_cache=False)) == a


def test_generation_past_context_length_slides_the_cache():
    model = peaked_model()
    prompt = list(range(40))  # longer than the 32-token context
    tokens = list(generate(model, prompt, 50, temperature=0))
    assert len(tokens) == 50 and all(0 <= t < 64 for t in tokens)
    assert len(list(generate(model, prompt, 50, temperature=0, use_cache=False))) == 50


def test_stop_ids_end_generation_after_yielding_the_stop_token():
    model = peaked_model()
    free = list(generate(model, [1, 2, 3], 12, temperature=0))
    stop = free[4]
    stopped = list(generate(model, [1, 2, 3], 12, temperature=0, stop_ids=[stop]))
    assert stopped == free[: free.index(stop) + 1]


@pytest.mark.parametrize(
    "prompt,new,match",
    [
        ([], 5, "prompt_ids is empty"),
        ([1, 64], 5, "token id 64 is outside the vocabulary"),
        ([-1], 5, "token id -1"),
        ([[1, 2]], 5, "1-D"),
        ([1], 0, "max_new_tokens"),
    ],
)
def test_bad_generate_arguments_raise_at_call_time(prompt, new, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), prompt, new, temperature=0)
