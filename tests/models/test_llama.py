"""Llama baseline invariants (architectures.md §1(f)) and the model registry contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tfkit.config import ModelConfig, count_params, flops_per_token
from tfkit.errors import CheckpointError, ConfigError
from tfkit.models import REGISTRY, Llama, ModelOutput, build_model
from tfkit.models import layers
from tfkit.train.sample import generate


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context_length=32)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, attention: str = "sdpa", **kw) -> Llama:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**kw), attention=attention).eval()


def rand_ids(b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (b, t), generator=g)


# -- build_model / registry -----------------------------------------------------------------


def test_build_model_needs_vocab_size():
    with pytest.raises(ConfigError, match="vocab_size") as exc:
        build_model(tiny_cfg(vocab_size=None))
    assert "set model.vocab_size or give a tokenizer" in exc.value.hint


def test_build_model_unknown_arch_lists_registry():
    cfg = tiny_cfg().model_copy(update={"arch": "gpt9"})
    with pytest.raises(ConfigError, match="gpt9") as exc:
        build_model(cfg)
    assert "llama" in exc.value.hint


def test_build_model_unknown_attention():
    with pytest.raises(ConfigError, match="attention backend 'cudnn'") as exc:
        build_model(tiny_cfg(), attention="cudnn")
    assert "sdpa" in exc.value.hint


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_registry_entry_trains_generates_and_round_trips(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch=arch))
    assert isinstance(model, REGISTRY[arch]) and model.config.arch == arch
    ids = rand_ids()
    out = model(ids, targets=ids)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 16, 64)
    assert out.loss.dim() == 0 and "ce" in out.parts and not out.parts["ce"].requires_grad
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    tokens = list(generate(model, [1, 2, 3], max_new_tokens=5, temperature=0))
    assert len(tokens) == 5 and all(0 <= t < 64 for t in tokens)
    save_file(model.state_dict_for_save(), tmp_path / "model.safetensors")
    fresh = build_model(tiny_cfg(arch=arch))
    fresh.load_state_dict_from_save(load_file(tmp_path / "model.safetensors"))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


# -- §1(f)1 causality -----------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_perturbing_a_later_token_leaves_earlier_logits_unchanged(attention):
    model = tiny_model(attention=attention)
    ids = rand_ids()
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 7, 14):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 17) % 64
            out = model(changed).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-6)


# -- §1(f)2 cached decoding -----------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_cached_decoding_one_token_at_a_time_equals_full_forward(attention, n_kv_heads):
    model = tiny_model(attention=attention, n_kv_heads=n_kv_heads)
    ids = rand_ids(t=20)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(batch_size=2, max_len=32)
        steps = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 20):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cached_multi_token_chunk_after_prefill_equals_full_forward(attention):
    model = tiny_model(attention=attention)
    ids = rand_ids(t=24)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(batch_size=2)
        a = model(ids[:, :5], cache=cache).logits
        b = model(ids[:, 5:12], cache=cache).logits
        c = model(ids[:, 12:13], cache=cache).logits
        d = model(ids[:, 13:], cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b, c, d], dim=1), full, atol=1e-4, rtol=0)


def test_cache_overflow_raises_clear_error():
    model = tiny_model()
    cache = model.new_cache(batch_size=1, max_len=8)
    with torch.no_grad():
        model(rand_ids(1, 6), cache=cache)
        with pytest.raises(ValueError, match="KVCache full: 6 cached \\+ 3 new tokens > max_len=8"):
            model(rand_ids(1, 3), cache=cache)
    assert cache.length == 6  # the refused call wrote nothing


def test_new_cache_shapes_and_dtype_under_autocast():
    model = tiny_model()
    cache = model.new_cache(batch_size=3)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 32, 8) and cache.k[0].dtype == torch.float32
    ids = rand_ids(1, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(batch_size=1)
        assert cache.k[0].dtype == torch.bfloat16
        full = model(ids).logits.float()
        pre = model(ids[:, :9], cache=cache).logits.float()
        last = model(ids[:, 9:], cache=cache).logits.float()
    torch.testing.assert_close(torch.cat([pre, last], 1), full, atol=0.05, rtol=0.05)


# -- §1(f)3 GQA vs MHA ----------------------------------------------------------------------


def test_mha_when_kv_heads_equal_heads():
    model = tiny_model(n_kv_heads=4)
    assert model.blocks[0].attn.wk.weight.shape == (32, 32)
    assert model(rand_ids()).logits.shape == (2, 16, 64)
    assert tiny_model(n_kv_heads=None).blocks[0].attn.wv.weight.shape == (32, 32)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gqa_equals_mha_with_repeated_kv_weights(attention):
    gqa = tiny_model(attention=attention, n_kv_heads=2, qk_norm=True)
    mha = tiny_model(attention=attention, n_kv_heads=4, qk_norm=True, seed=5)
    state = gqa.state_dict()
    head_dim, group = 8, 2
    for name, w in list(state.items()):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            state[name] = w.view(2, head_dim, 32).repeat_interleave(group, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = rand_ids()
    with torch.no_grad():
        torch.testing.assert_close(mha(ids).logits, gqa(ids).logits, atol=1e-5, rtol=1e-5)


# -- §1(f)5 tying and init ------------------------------------------------------------------


def test_tied_head_shares_storage_and_untied_has_its_own():
    tied = tiny_model()
    assert tied.output_weight.data_ptr() == tied.embed.weight.data_ptr()
    assert "head.weight" not in tied.state_dict()
    untied = tiny_model(tie_embeddings=False)
    assert untied.output_weight.data_ptr() != untied.embed.weight.data_ptr()
    assert "head.weight" in untied.state_dict()
    # a gradient step on the tied model moves the head together with the embedding
    out = tied(rand_ids(), targets=rand_ids(seed=2))
    out.loss.backward()
    assert tied.embed.weight.grad is not None and tied.embed.weight.grad.abs().sum() > 0


def test_parameter_names_are_stable():
    names = set(tiny_model(qk_norm=True, tie_embeddings=False).state_dict())
    for expected in ("embed.weight", "blocks.0.attn_norm.weight", "blocks.0.attn.wq.weight", "blocks.0.attn.wk.weight",
                     "blocks.0.attn.wv.weight", "blocks.0.attn.wo.weight", "blocks.0.attn.q_norm.weight",
                     "blocks.0.attn.k_norm.weight", "blocks.1.ffn_norm.weight", "blocks.1.ffn.w1.weight",
                     "blocks.1.ffn.w2.weight", "blocks.1.ffn.w3.weight", "norm.weight", "head.weight"):
        assert expected in names
    assert not any("rope" in n for n in names)


def test_scaled_init_of_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=6, n_heads=4, context_length=16, init_std=0.02)
    model = build_model(cfg)
    target = 0.02 / math.sqrt(2 * 6)
    for block in model.blocks:
        for w in (block.attn.wo.weight, block.ffn.w2.weight):
            assert abs(w.std().item() - target) / target < 0.1
        for w in (block.attn.wq.weight, block.ffn.w1.weight):
            assert abs(w.std().item() - 0.02) / 0.02 < 0.1
        assert torch.equal(block.attn_norm.weight.detach(), torch.ones(256))
    assert abs(model.embed.weight.std().item() - 0.02) / 0.02 < 0.1
    assert torch.equal(model.norm.weight.detach(), torch.ones(256))


# -- attention backends ---------------------------------------------------------------------


def test_sdpa_equals_eager_full_model(monkeypatch):
    sdpa, eager = tiny_model(attention="sdpa"), tiny_model(attention="eager")
    ids = rand_ids()
    with torch.no_grad():
        a, b = sdpa(ids).logits, eager(ids).logits
        monkeypatch.setattr(layers, "SDPA_SUPPORTS_GQA", False)
        c = sdpa(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


# -- variants, loss, params -----------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(qk_norm=True), dict(ffn="geglu"), dict(qk_norm=True, ffn="geglu", tie_embeddings=False)])
def test_qk_norm_and_geglu_variants_run_forward_and_backward(kw):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**kw))
    out = model(rand_ids(), targets=rand_ids(seed=3))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_loss_is_cross_entropy_ignoring_minus_one():
    model = tiny_model()
    ids, targets = rand_ids(), rand_ids(seed=4)
    targets[0, :5] = -1
    targets[1, -3:] = -1
    out = model(ids, targets=targets)
    expected = F.cross_entropy(out.logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(out.loss, expected)
    assert out.loss.dtype == torch.float32 and torch.equal(out.parts["ce"], out.loss.detach())
    assert out.stats == {} and model(ids).loss is None
    with pytest.raises(ValueError, match="targets shape"):
        model(ids, targets=targets[:, :3])


def test_num_params_and_flops_match_config_estimates():
    for kw in (dict(), dict(tie_embeddings=False, qk_norm=True)):
        cfg = tiny_cfg(**kw)
        model = build_model(cfg)
        assert model.num_params() == count_params(cfg) == sum(p.numel() for p in model.parameters())
        assert model.num_params(non_embedding=True) == model.num_params() - 64 * 32
        assert model.flops_per_token(cfg.context_length) == pytest.approx(flops_per_token(cfg))
        assert model.flops_per_token(64) > model.flops_per_token(32)


# -- save / load ----------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_round_trip_gives_identical_logits(tie, tmp_path):
    model = tiny_model(tie_embeddings=tie, qk_norm=True)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict_for_save(), path)
    torch.manual_seed(123)
    fresh = build_model(tiny_cfg(tie_embeddings=tie, qk_norm=True)).eval()
    fresh.load_state_dict_from_save(load_file(path))
    ids = rand_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    if tie:
        assert fresh.output_weight.data_ptr() == fresh.embed.weight.data_ptr()


def test_loading_weights_of_another_shape_raises_checkpoint_error():
    tensors = tiny_model().state_dict_for_save()
    other = build_model(tiny_cfg(d_model=64))
    with pytest.raises(CheckpointError, match=r"shape mismatch blocks\.0\.attn\.wk\.weight \(16, 32\) != \(32, 64\).*more\)"):
        other.load_state_dict_from_save(tensors)
    del tensors["norm.weight"]
    tensors["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing norm.weight; unexpected extra.weight"):
        tiny_model().load_state_dict_from_save(tensors)


# -- gradient checkpointing -----------------------------------------------------------------


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = build_model(tiny_cfg())
    torch.manual_seed(0)
    ckpt = build_model(tiny_cfg(), grad_checkpointing=True)
    ids, targets = rand_ids(), rand_ids(seed=6)
    plain(ids, targets=targets).loss.backward()
    out = ckpt(ids, targets=targets)
    assert out.logits.grad_fn is not None
    out.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_forward_longer_than_context_extrapolates_rope():
    model = tiny_model()
    with torch.no_grad():
        out = model(rand_ids(1, 40))
    assert out.logits.shape == (1, 40, 64) and torch.isfinite(out.logits).all()


def test_chunked_cross_entropy_equals_the_whole_batch_one_in_value_and_gradient(monkeypatch):
    from tfkit.models import base

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :4] = -1  # ignored positions count in neither sum nor mean
    whole = base.cross_entropy(logits, targets)
    (g_whole,) = torch.autograd.grad(whole, logits)
    monkeypatch.setattr(base, "CE_CHUNK_ELEMENTS", 4 * 50)  # the name base.py reads  # chunks of 4 rows: 6 chunks, the last short
    chunked = base.cross_entropy(logits, targets)
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)
    assert torch.allclose(g_chunked.float(), g_whole.float(), atol=1e-3, rtol=0)
