"""Behaviour of the shared layers: RMSNorm, RoPE, attention backends, FFN, Block, KVCache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tfkit.config import ModelConfig
from tfkit.models import layers
from tfkit.models.layers import (
    Attention,
    Block,
    FeedForward,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    eager_attention,
    sdpa_attention,
)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context_length=32)
    base.update(kw)
    return ModelConfig(**base)


# -- RMSNorm --------------------------------------------------------------------------------


def test_rmsnorm_matches_formula_and_gain_starts_at_one():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    assert torch.equal(norm.weight.detach(), torch.ones(16))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)


def test_rmsnorm_keeps_input_dtype_and_computes_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    x = (torch.randn(4, 8) * 300).to(torch.bfloat16)  # squares overflow nothing in fp32
    out = norm(x)
    assert out.dtype == torch.bfloat16
    ref = norm(x.float()).to(torch.bfloat16)
    assert torch.equal(out, ref)


# -- RoPE -----------------------------------------------------------------------------------


def test_rope_preserves_norms():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, context_length=32)
    x = torch.randn(2, 3, 32, 16)
    cos, sin = rope(0, 32)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_rope_dot_product_depends_only_on_offset():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, context_length=64)
    q, k = torch.randn(16), torch.randn(16)

    def rotated_dot(m: int, n: int) -> float:
        cm, sm = rope(m, 1)
        cn, sn = rope(n, 1)
        qm = apply_rotary(q.view(1, 1, 1, 16), cm, sm).flatten()
        kn = apply_rotary(k.view(1, 1, 1, 16), cn, sn).flatten()
        return float(qm @ kn)

    for delta in (0, 1, 5, 17):
        dots = [rotated_dot(m, m - delta) for m in (delta, delta + 3, delta + 20, 60)]
        assert max(dots) - min(dots) < 1e-4, (delta, dots)
    assert abs(rotated_dot(5, 0) - rotated_dot(0, 5)) > 1e-3  # direction matters


def test_rope_rotates_consecutive_pairs_by_documented_angle():
    rope = RotaryEmbedding(head_dim=4, context_length=8, theta=100.0)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    cos, sin = rope(3, 1)
    y = apply_rotary(x, cos, sin).flatten()
    a0, a1 = 3 * 100.0 ** (-0 / 4), 3 * 100.0 ** (-2 / 4)
    expected = torch.tensor([math.cos(a0), math.sin(a0), math.cos(a1), math.sin(a1)])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_rope_extends_past_context_length_and_buffers_are_not_saved():
    short = RotaryEmbedding(head_dim=8, context_length=8)
    long = RotaryEmbedding(head_dim=8, context_length=64)
    c1, s1 = short(30, 5)
    c2, s2 = long(30, 5)
    assert short.cos.shape[0] >= 35
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(s1, s2)
    assert short.state_dict() == {}


def test_rope_tables_rebuilt_in_fp32_after_dtype_cast():
    rope = RotaryEmbedding(head_dim=8, context_length=16).to(torch.bfloat16)
    cos, _ = rope(0, 4)
    assert cos.dtype == torch.float32


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(head_dim=7, context_length=8)


# -- attention kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("t,s", [(9, 9), (1, 9), (4, 9)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_equals_eager_reference(t, s, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, t, 8)
    k, v = torch.randn(2, kv_heads, s, 8), torch.randn(2, kv_heads, s, 8)
    torch.testing.assert_close(sdpa_attention(q, k, v), eager_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_eager_attention_is_causal_with_bottom_right_alignment():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 8)
    k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out = eager_attention(q, k, v)
    # query i sits at position 4 + i, so it must not see keys after it
    for i in range(3):
        pos = 4 + i
        scores = torch.einsum("hd,hsd->hs", q[0, :, i], k[0, :, : pos + 1]) / math.sqrt(8)  # (H, pos+1)
        ref = torch.einsum("hs,hsd->hd", scores.softmax(-1), v[0, :, : pos + 1])  # (H, D)
        torch.testing.assert_close(out[0, :, i], ref, atol=1e-5, rtol=1e-5)


def test_sdpa_gqa_fallback_without_enable_gqa_matches(monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(2, 6, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    native = sdpa_attention(q, k, v)
    monkeypatch.setattr(layers, "SDPA_SUPPORTS_GQA", False)
    fallback = sdpa_attention(q, k, v)
    torch.testing.assert_close(native, fallback, atol=1e-6, rtol=1e-6)


def test_attention_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn'"):
        Attention(tiny_cfg(), attention="cudnn")


def test_flash_backend_refuses_fp32_with_a_hint():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        layers.flash_attention(q, q, q)


# -- KV cache -------------------------------------------------------------------------------


def test_kv_cache_update_returns_everything_so_far_and_refuses_overflow():
    cache = KVCache(n_layers=1, batch_size=2, n_kv_heads=2, max_len=5, head_dim=4)
    k1, v1 = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    k, v = cache.update(0, k1, v1)
    cache.advance(3)
    assert k.shape == (2, 2, 3, 4) and torch.equal(v, v1)
    k2 = torch.randn(2, 2, 2, 4)
    cache.check_room(2, 2)
    k, _ = cache.update(0, k2, k2)
    cache.advance(2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2))
    with pytest.raises(ValueError, match="KVCache full: 5 cached \\+ 1 new tokens > max_len=5"):
        cache.check_room(2, 1)
    with pytest.raises(ValueError, match="batch size 2"):
        cache.check_room(3, 0)
    cache.reset()
    assert cache.length == 0
    cache.check_room(2, 5)


# -- FFN and block --------------------------------------------------------------------------


@pytest.mark.parametrize("kind,act", [("swiglu", F.silu), ("geglu", lambda t: F.gelu(t, approximate="none"))])
def test_feedforward_formula(kind, act):
    torch.manual_seed(0)
    ffn = FeedForward(16, 48, kind)
    x = torch.randn(2, 3, 16)
    expected = ffn.w2(act(ffn.w1(x)) * ffn.w3(x))
    torch.testing.assert_close(ffn(x), expected)
    assert all(m.bias is None for m in (ffn.w1, ffn.w2, ffn.w3))


def test_feedforward_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown ffn 'relu'"):
        FeedForward(8, 16, "relu")


def test_block_is_prenorm_residual():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    block = Block(cfg)
    rope = RotaryEmbedding(cfg.head_size, cfg.context_length)
    x = torch.randn(2, 7, cfg.d_model)
    cos, sin = rope(0, 7)
    u = x + block.attn(block.attn_norm(x), cos, sin)
    expected = u + block.ffn(block.ffn_norm(u))
    torch.testing.assert_close(block(x, cos, sin), expected)
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 and all(m.bias is None for m in linears)


def test_rotary_complex_form_equals_the_real_form_used_under_compile(monkeypatch):
    torch.manual_seed(0)
    rope = layers.RotaryEmbedding(16, 32)
    cos, sin = rope(0, 32)
    x = torch.randn(2, 3, 32, 16, dtype=torch.float64).float()
    eager = layers.apply_rotary(x, cos, sin)
    monkeypatch.setattr(layers, "_compiling", lambda: True)
    real = layers.apply_rotary(x, cos, sin)
    assert torch.allclose(eager, real, atol=1e-6, rtol=0)
    # and it is a rotation: each pair keeps its length
    pairs = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pairs(eager), pairs(x), atol=1e-5)
