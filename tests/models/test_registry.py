"""The contract every ``model.arch`` in the registry keeps (a parametrised walk over REGISTRY).

Forward and backward, loss falling on a Shakespeare play, save/load, cached vs uncached greedy
generation, causality and cached decoding in decoding mode. Each variant's own invariants live in
its own test file (architectures.md §2-5 (f)).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tfkit.config import ModelConfig
from tfkit.models import REGISTRY, ModelOutput, build_model
from tfkit.train.sample import generate

VARIANT = {"mod": {"capacity": 0.5}, "dtf": {"ma_window": 4}, "free": {"latent_bits": 4}, "mhc": {"n_streams": 2}}


def cfg_for(arch: str, **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=256, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, context_length=32)
    if arch in VARIANT:
        base[arch] = VARIANT[arch]
    base.update(kw)
    return ModelConfig(**base)


def model_for(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(cfg_for(arch, **kw))


def rand_ids(b: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


ARCHS = sorted(REGISTRY)


def test_registry_has_every_documented_arch():
    from tfkit.config import ARCHS as CONFIG_ARCHS

    assert sorted(CONFIG_ARCHS) == ARCHS == ["dtf", "free", "llama", "mhc", "mod"]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_reaches_every_parameter(arch):
    model = model_for(arch).train()
    ids = rand_ids()
    out = model(ids, targets=ids)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 24, 256)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert "ce" in out.parts and all(not torch.as_tensor(v).requires_grad for v in out.parts.values())
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in [*out.parts.values(), *out.stats.values()])
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_on_a_play(arch, play):
    data = torch.tensor(list(play.read_bytes()[:60_000]), dtype=torch.long)  # bytes as tokens, vocab 256
    model = model_for(arch).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ces = []
    for _ in range(40):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        window = torch.stack([data[s:s + 33] for s in starts])  # (8, 33)
        out = model(window[:, :-1], targets=window[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        ces.append(float(out.parts["ce"]))
    first, last = sum(ces[:5]) / 5, sum(ces[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)  # ln 256 = 5.55 nats at the start


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_gives_identical_logits(arch, tmp_path):
    model = model_for(arch, seed=3).eval()
    save_file(model.state_dict_for_save(), tmp_path / "model.safetensors")
    fresh = model_for(arch, seed=4).eval()
    fresh.load_state_dict_from_save(load_file(tmp_path / "model.safetensors"))
    ids = rand_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
        with model.decoding(seed=1), fresh.decoding(seed=1):
            assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_and_without_cache_gives_the_same_greedy_tokens(arch):
    model = model_for(arch, seed=5)
    prompt = rand_ids(1, 5, seed=2)[0]
    cached = list(generate(model, prompt, max_new_tokens=20, temperature=0, seed=11, use_cache=True))
    uncached = list(generate(model, prompt, max_new_tokens=20, temperature=0, seed=11, use_cache=False))
    assert cached == uncached and len(cached) == 20
    assert model.training  # generate restores the mode


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_mode_is_causal(arch):
    model = model_for(arch, seed=6).eval()
    ids = rand_ids()
    with torch.no_grad(), model.decoding(seed=0):
        base = model(ids).logits
        for t in (0, 9, 20):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 17) % 256
            out = model(changed).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_the_full_forward(arch):
    model = model_for(arch, seed=7).eval()
    ids = rand_ids(2, 20)
    with torch.no_grad(), model.decoding(seed=3):
        full = model(ids).logits  # (2, 20, V)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :6], cache=cache).logits]  # prefill
        steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(6, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mhc"])
def test_architectures_without_routing_or_latents_are_causal_in_training_mode_too(arch):
    model = model_for(arch, seed=8).train()
    ids = rand_ids()
    with torch.no_grad():
        base = model(ids).logits
        changed = ids.clone()
        changed[:, 12] = (changed[:, 12] + 5) % 256
        torch.testing.assert_close(model(changed).logits[:, :12], base[:, :12], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_num_params_matches_the_saved_tensors_and_flops_grow_with_context(arch):
    model = model_for(arch)
    saved = model.state_dict_for_save()  # one key per storage, what a checkpoint holds
    buffers = {n for n, _ in model.named_buffers()}
    assert model.num_params() == sum(t.numel() for n, t in saved.items() if n not in buffers)
    assert model.num_params(non_embedding=True) == model.num_params() - model.embed.weight.numel()
    assert model.flops_per_token(64) > model.flops_per_token(32)  # the attention term scales with T


@pytest.mark.parametrize("arch", ARCHS)
def test_a_meta_built_model_with_loaded_weights_equals_the_original(arch):
    """``build_model(device="meta").materialize()`` + a strict load (how `eval`, `generate` and
    `export` load a checkpoint, with no random init) gives the same logits and the same cached
    greedy tokens: the constant buffers (RoPE tables, the Free Transformer's bit table) are rebuilt."""
    from tfkit.models.layers import RotaryEmbedding

    model = model_for(arch).eval()
    twin = build_model(cfg_for(arch), device="meta").materialize("cpu").eval()
    assert all(not t.is_meta for t in [*twin.parameters(), *twin.buffers()])
    twin.load_state_dict_from_save(model.state_dict_for_save())
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)
    assert isinstance(twin.rope, RotaryEmbedding) and torch.equal(twin.rope.cos, model.rope.cos)
    ids = rand_ids()
    with torch.no_grad(), model.decoding(seed=0), twin.decoding(seed=0):
        assert torch.equal(model(ids).logits, twin(ids).logits)
    prompt = rand_ids(1, 5)[0].tolist()
    assert list(generate(model, prompt, 8, temperature=0)) == list(generate(twin, prompt, 8, temperature=0))
