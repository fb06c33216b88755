"""tfkit.hardware: detection, the fake-hardware override, resolve() rules, presets for auto, peak FLOP/s."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tfkit import config, hardware
from tfkit.errors import HardwareError
from tfkit.hardware import GPU, Hardware, Runtime


def fake(name: str, **changes) -> Hardware:
    return dataclasses.replace(hardware.fake_hardware(name), **changes)


def system(**fields) -> config.SystemConfig:
    return config.SystemConfig(**fields)


def with_flash(hw: Hardware) -> Hardware:
    return dataclasses.replace(hw, flash_attn="2.6.3", flash_attn_reason="flash-attn 2.6.3 importable")


def gpu_machine(name: str, cap=(8, 0), memory=80 * hardware.GiB) -> Hardware:
    return fake("cpu", gpus=(GPU(0, name, memory, cap, cap >= (8, 0)),), cuda_version="12.4")


# ---------------------------------------------------------------------------------------------
# detection


def test_detect_describes_this_machine(monkeypatch):
    import torch

    monkeypatch.delenv(hardware.FAKE_ENV, raising=False)
    hw = hardware.detect()
    assert hw is hardware.detect()  # cached
    assert hw.torch_version == str(torch.__version__)
    assert hw.cpu_cores >= 1 and hw.ram_bytes > 0
    assert len(hw.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert hw.mps == torch.backends.mps.is_available()
    assert hw.tokenizers_version
    assert (hw.flash_attn is None) == ("not" in hw.flash_attn_reason)


@pytest.mark.parametrize("name", hardware.FAKE_PROFILES)
def test_fake_profile_by_env_and_json_file_round_trip(monkeypatch, tmp_path, name):
    monkeypatch.setenv(hardware.FAKE_ENV, name)
    hw = hardware.detect()
    assert hw == hardware.fake_hardware(name)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(hw.to_dict()))
    monkeypatch.setenv(hardware.FAKE_ENV, str(path))
    assert hardware.detect() == hw


def test_fake_json_missing_fields_take_cpu_defaults(monkeypatch, tmp_path):
    path = tmp_path / "a100.json"
    path.write_text(json.dumps({"gpus": [{"name": "NVIDIA A100-SXM4-40GB", "memory_bytes": 40 * 10**9,
                                          "capability": [8, 0]}]}))
    monkeypatch.setenv(hardware.FAKE_ENV, str(path))
    hw = hardware.detect()
    assert hw.gpus == (GPU(0, "NVIDIA A100-SXM4-40GB", 40 * 10**9, (8, 0), True),)
    assert hw.mps is False and hw.flash_attn is None and hw.python_version


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"gpu_count": 3}), "unknown field.*gpu_count"),
    (json.dumps({"gpus": [{"name": "X"}]}), r"gpus\[0\] is malformed"),
])
def test_bad_fake_file_is_a_hardware_error(monkeypatch, tmp_path, content, match):
    path = tmp_path / "hw.json"
    path.write_text(content)
    monkeypatch.setenv(hardware.FAKE_ENV, str(path))
    with pytest.raises(HardwareError, match=match) as info:
        hardware.detect()
    assert hardware.FAKE_ENV in info.value.hint or "capability" in info.value.hint


def test_missing_fake_file_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv(hardware.FAKE_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(HardwareError, match="nope.json"):
        hardware.detect()


def test_cudnn_version_formatting():
    assert hardware._cudnn_str(90100) == "9.1.0"
    assert hardware._cudnn_str(8902) == "8.9.2"
    assert hardware._cudnn_str(None) is None


# ---------------------------------------------------------------------------------------------
# resolve(): auto choices and their reasons


@pytest.mark.parametrize("name, device, precision, attention, compile_", [
    ("h100", "cuda", "bf16", "sdpa", True),
    ("v100", "cuda", "fp16", "sdpa", True),
    ("gtx1080", "cuda", "fp32", "sdpa", False),
    ("mps", "mps", "fp32", "sdpa", False),
    ("cpu", "cpu", "fp32", "sdpa", False),
])
def test_auto_choices_per_machine(name, device, precision, attention, compile_):
    rt = hardware.resolve(system(), hardware.fake_hardware(name))
    assert (rt.device, rt.precision, rt.attention, rt.compile) == (device, precision, attention, compile_)
    assert set(rt.reasons) == {"device", "precision", "attention", "compile"}
    assert all(r.startswith("auto:") and "\n" not in r for r in rt.reasons.values())


def test_auto_reasons_say_why():
    cpu = hardware.resolve(system(), fake("cpu"))
    assert "bf16 matmuls measured 5x slower than fp32 on CPU" in cpu.reasons["precision"]
    assert "compile time outweighs gains on short CPU runs" in cpu.reasons["compile"]
    assert "flash-attn is not installed" in cpu.reasons["attention"]
    v100 = hardware.resolve(system(), fake("v100"))
    assert "7.0" in v100.reasons["precision"] and "grad scaler" in v100.reasons["precision"]
    h100 = hardware.resolve(system(), fake("h100"))
    assert "H100" in h100.reasons["device"] and "9.0" in h100.reasons["precision"]


def test_h100_uses_flash_when_installed():
    rt = hardware.resolve(system(), with_flash(fake("h100")))
    assert rt.attention == "flash" and "2.6.3" in rt.reasons["attention"]
    fp32 = hardware.resolve(system(precision="fp32"), with_flash(fake("h100")))
    assert fp32.attention == "sdpa" and "bf16 or fp16" in fp32.reasons["attention"]
    v100 = hardware.resolve(system(), with_flash(fake("v100")))
    assert v100.attention == "sdpa" and ">= 8.0" in v100.reasons["attention"]


def test_runtime_properties():
    bf16 = hardware.resolve(system(), fake("h100"))
    assert (bf16.autocast_dtype, bf16.needs_grad_scaler, bf16.device_type, bf16.gpu_index) == ("bfloat16", False, "cuda", 0)
    fp16 = hardware.resolve(system(), fake("v100"))
    assert (fp16.autocast_dtype, fp16.needs_grad_scaler) == ("float16", True)
    cpu = hardware.resolve(system(), fake("cpu"))
    assert (cpu.autocast_dtype, cpu.needs_grad_scaler, cpu.gpu_index) == (None, False, None)
    assert Runtime("cuda:1", "fp32", "sdpa", False).gpu_index == 1


def test_explicit_possible_choices_are_honoured():
    rt = hardware.resolve(system(device="cpu", precision="bf16", attention="eager", compile="true"), fake("h100"))
    assert (rt.device, rt.precision, rt.attention, rt.compile) == ("cpu", "bf16", "eager", True)
    assert "5x slower" in rt.reasons["precision"]
    assert all(r.startswith("requested") for r in rt.reasons.values())
    rt = hardware.resolve(system(precision="fp16", compile="false"), fake("h100"))
    assert (rt.precision, rt.compile, rt.needs_grad_scaler) == ("fp16", False, True)


@pytest.mark.parametrize("machine, fields, match, hint", [
    ("cpu", {"device": "cuda"}, "system.device=cuda.*no CUDA GPU", "--set system.device=cpu"),
    ("cpu", {"device": "mps"}, "system.device=mps.*MPS is not available", "--set system.device=cpu"),
    ("mps", {"device": "cuda"}, "no CUDA GPU", "--set system.device=cpu"),
    ("v100", {"precision": "bf16"}, "V100.*no bf16 support", "system.precision=fp16"),
    ("gtx1080", {"precision": "bf16"}, "GTX 1080.*6.1.*no bf16", "system.precision=fp16"),
    ("cpu", {"precision": "fp16"}, "fp16 is not supported on the CPU", "system.precision=fp32"),
    ("h100", {"attention": "flash"}, "flash-attn is not installed", "pip install 'tfkit[flash]'"),
    ("cpu", {"attention": "flash"}, "attention=flash.*not installed", "pip install 'tfkit[flash]'"),
    ("gtx1080", {"compile": "true"}, "Triton.*6.1", "--set system.compile=false"),
])
def test_impossible_explicit_choices_raise(machine, fields, match, hint):
    with pytest.raises(HardwareError, match=match) as info:
        hardware.resolve(system(**fields), fake(machine))
    assert hint in info.value.hint


@pytest.mark.parametrize("machine, fields, match", [
    ("v100", {"attention": "flash"}, "compute capability >= 8.0.*7.0"),
    ("cpu", {"attention": "flash"}, "needs a CUDA GPU"),
    ("h100", {"attention": "flash", "precision": "fp32"}, "bf16 or fp16"),
])
def test_flash_installed_but_unusable_says_why(machine, fields, match):
    with pytest.raises(HardwareError, match=match) as info:
        hardware.resolve(system(**fields), with_flash(fake(machine)))
    assert "system.attention=sdpa" in info.value.hint


# ---------------------------------------------------------------------------------------------
# choose_preset (--preset auto)


def choose(name: str):
    hw = fake(name)
    return hardware.choose_preset(hw, hardware.resolve(system(), hw))


def test_cpu_always_picks_nano_but_reports_memory():
    choice = choose("cpu")
    assert choice.name == "nano"
    assert choice.reason.startswith("CPU: compute-bound, larger presets would not train meaningfully in minutes")
    assert 0 < choice.estimate_bytes <= choice.budget_bytes == int(0.8 * 24 * hardware.GiB)


def test_big_gpu_picks_a_large_preset_small_gpu_a_smaller_one():
    names = config.list_presets()
    h100, v100 = choose("h100"), choose("v100")
    assert h100.name == names[-1]  # every shipped preset fits in 80% of 80 GB
    assert names.index(v100.name) < names.index(h100.name)
    assert v100.name != "nano" and v100.estimate_bytes <= v100.budget_bytes
    too_big = [n for n, _, fits in v100.table if not fits]
    assert too_big and all(names.index(n) > names.index(v100.name) for n in too_big)


def test_mps_is_capped_at_tiny():
    hw = fake("mps", ram_bytes=128 * hardware.GiB)  # lots of unified memory: the cap still applies
    choice = hardware.choose_preset(hw, hardware.resolve(system(), hw))
    assert choice.name == "tiny" and "MPS" in choice.reason


def test_table_is_each_presets_least_memory_and_grows_with_size():
    choice = choose("h100")
    names = config.list_presets()
    assert [n for n, _, _ in choice.table] == names
    params = []
    for name, est, fits in choice.table:
        cfg = config.load(preset=name)
        assert est == config.estimate_train_memory(cfg, bytes_per_activation=2, vocab_size=4096,
                                                   batch_size=cfg.train.batch_size // 4, grad_checkpointing=True)["total"]
        assert fits == (est <= choice.budget_bytes)
        params.append(config.count_params(cfg.model, 4096))
    assert params == sorted(params) and len(set(params)) == len(params)
    ests = [e for _, e, _ in choice.table]
    assert ests == sorted(ests) and len(set(ests)) == len(ests)  # monotone over the presets


_MACHINES = {  # name, GiB, compute capability
    "h100": ("NVIDIA H100 80GB HBM3", 80, (9, 0)), "h200": ("NVIDIA H200", 141, (9, 0)),
    "a100-40": ("NVIDIA A100-SXM4-40GB", 40, (8, 0)), "rtx4090": ("NVIDIA GeForce RTX 4090", 24, (8, 9)),
    "v100-32": ("Tesla V100-SXM2-32GB", 32, (7, 0)), "t4": ("Tesla T4", 16, (7, 5)),
}


@pytest.mark.parametrize("machine", sorted(_MACHINES))
def test_auto_picks_the_largest_micro_batch_that_fits_and_checkpoints_only_when_needed(machine):
    name, gib, cap = _MACHINES[machine]
    hw = gpu_machine(name, cap=cap, memory=gib * 1024**3)
    rt = hardware.resolve(system(), hw)
    choice = hardware.choose_preset(hw, rt)
    cfg = config.load(preset=choice.name)
    act = 2 if rt.precision in ("bf16", "fp16") else 4

    def est(b, ckpt):
        return config.estimate_train_memory(cfg, bytes_per_activation=act, vocab_size=4096, batch_size=b,
                                            grad_checkpointing=ckpt)["total"]

    b, a, ckpt = choice.batch_size, choice.grad_accum_steps, choice.grad_checkpointing
    assert b * a == cfg.train.batch_size * cfg.train.grad_accum_steps  # the preset's tokens per step
    assert choice.estimate_bytes == est(b, ckpt) <= choice.budget_bytes
    per_step, least = b * a, cfg.train.batch_size // 4
    bigger = [x for x in range(b + 1, per_step + 1) if per_step % x == 0]
    assert b >= least
    if ckpt:  # checkpointing only when no micro-batch fits without it
        assert all(est(x, False) > choice.budget_bytes for x in range(least, per_step + 1) if per_step % x == 0)
    assert all(est(x, ckpt) > choice.budget_bytes for x in bigger)  # and the largest micro-batch that fits
    names = config.list_presets()
    nxt = names.index(choice.name) + 1
    assert nxt == len(names) or not choice.table[nxt][2]  # nothing larger would fit


def test_bigger_gpus_never_get_smaller_presets():
    names = config.list_presets()
    order = ["t4", "rtx4090", "a100-40", "h100", "h200"]
    picks = []
    for machine in order:
        name, gib, cap = _MACHINES[machine]
        hw = gpu_machine(name, cap=cap, memory=gib * 1024**3)
        picks.append(names.index(hardware.choose_preset(hw, hardware.resolve(system(), hw)).name))
    assert picks == sorted(picks)


def test_mps_16gb_gets_tiny_with_its_own_batch():
    hw = fake("mps")
    choice = hardware.choose_preset(hw, hardware.resolve(system(), hw))
    cfg = config.load(preset="tiny")
    assert (choice.name, choice.batch_size, choice.grad_checkpointing) == ("tiny", cfg.train.batch_size, False)


def test_a_50k_vocab_small_run_fits_a_24gb_card_thanks_to_the_chunked_loss():
    cfg = config.load(preset="small", overrides=["model.vocab_size=50304"])
    budget = hardware.MEMORY_FRACTION * 24 * 1024**3
    est = config.estimate_train_memory(cfg, bytes_per_activation=2)
    assert est["total"] <= budget
    # the fp32 logits of the whole batch (upcast, log-softmax, gradient) alone would be 9.4 GiB more
    rows = cfg.train.batch_size * cfg.model.context_length * 50304
    assert est["total"] + 3 * 4 * (rows - config.CE_CHUNK_ELEMENTS) > budget


def test_the_estimate_counts_what_lives_on_the_device():
    cfg = config.load(preset="small", overrides=["model.vocab_size=4096"])
    gpu = config.estimate_train_memory(cfg, bytes_per_activation=2)
    assert gpu["context"] == config.CUDA_CONTEXT_BYTES and gpu["autocast_cache"] == 2 * gpu["params"]
    cpu = config.estimate_train_memory(cfg, bytes_per_activation=4, device_type="cpu")
    assert cpu["context"] == 0 and cpu["autocast_cache"] == 0
    eager = config.estimate_train_memory(cfg, bytes_per_activation=2, attention="eager")
    t, h, b, layers = cfg.model.context_length, cfg.model.n_heads, cfg.train.batch_size, cfg.model.n_layers
    assert eager["activations"] - gpu["activations"] == layers * b * t * 2 * h * t * 2  # the T x T scores
    sharded = config.estimate_train_memory(cfg, bytes_per_activation=2, shards=4)
    assert sharded["optimizer"] == gpu["optimizer"] // 4


def test_fp32_activations_exceed_bf16_ones_but_bf16_keeps_a_weight_copy():
    for name in config.list_presets():
        cfg = config.load(preset=name)
        fp32 = config.estimate_train_memory(cfg, bytes_per_activation=4)
        bf16 = config.estimate_train_memory(cfg, bytes_per_activation=2)
        assert fp32["activations"] > bf16["activations"] and fp32["logits"] > bf16["logits"]
        assert bf16["autocast_cache"] == 2 * bf16["params"] and fp32["autocast_cache"] == 0


def test_nothing_fits_is_a_hardware_error():
    hw = gpu_machine("NVIDIA Tiny", cap=(8, 6), memory=256 * 1024**2)
    with pytest.raises(HardwareError, match="no preset fits.*nano"):
        hardware.choose_preset(hw, hardware.resolve(system(), hw))


# ---------------------------------------------------------------------------------------------
# peak FLOP/s and device memory


@pytest.mark.parametrize("gpu, cap, precision, flops", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16", 989e12),
    ("NVIDIA H100 PCIe", (9, 0), "bf16", 756e12),
    ("NVIDIA H200", (9, 0), "bf16", 989e12),
    ("NVIDIA H100 NVL", (9, 0), "bf16", 835e12),
    ("NVIDIA H200 NVL", (9, 0), "bf16", 835e12),
    ("NVIDIA H800", (9, 0), "bf16", 989e12),
    ("NVIDIA H800 PCIe", (9, 0), "bf16", 756e12),
    ("NVIDIA B200", (10, 0), "bf16", 2250e12),
    ("NVIDIA H100 80GB HBM3", (9, 0), "fp32", 495e12),  # fp32 trains with TF32 matmuls there
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16", 312e12),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "fp32", 156e12),
    ("NVIDIA A10G", (8, 6), "bf16", 70e12),
    ("NVIDIA A10", (8, 6), "bf16", 125e12),
    ("NVIDIA L4", (8, 9), "bf16", 121e12),
    ("NVIDIA L40S", (8, 9), "bf16", 362e12),
    ("NVIDIA GeForce RTX 4090", (8, 9), "bf16", 165e12),
    ("NVIDIA GeForce RTX 3090", (8, 6), "bf16", 71e12),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16", 125e12),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp32", 15.7e12),
    ("Tesla T4", (7, 5), "fp16", 65e12),
    ("NVIDIA GeForce GTX 1080", (6, 1), "fp32", None),
    ("Some Future GPU", (10, 0), "bf16", None),
])
def test_peak_flops_table(gpu, cap, precision, flops):
    hw = gpu_machine(gpu, cap)
    rt = hardware.resolve(system(precision=precision), hw)
    assert hardware.peak_flops(hw, rt) == flops


def test_peak_flops_unknown_off_cuda():
    for name in ("cpu", "mps"):
        hw = fake(name)
        assert hardware.peak_flops(hw, hardware.resolve(system(), hw)) is None


def test_device_memory_bytes():
    h100, cpu, mps = fake("h100"), fake("cpu"), fake("mps")
    assert hardware.device_memory_bytes(h100, hardware.resolve(system(), h100)) == h100.gpus[0].memory_bytes
    assert hardware.device_memory_bytes(cpu, hardware.resolve(system(), cpu)) == cpu.ram_bytes
    assert hardware.device_memory_bytes(mps, hardware.resolve(system(), mps)) == mps.ram_bytes
    with pytest.raises(HardwareError, match="cuda:3 does not exist"):
        hardware.device_memory_bytes(h100, Runtime("cuda:3", "bf16", "sdpa", True))
