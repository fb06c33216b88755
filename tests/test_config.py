"""Config loading: precedence, typed overrides, validation messages, YAML round trip."""

import pytest

from tfkit import config
from tfkit.errors import ConfigError


def test_precedence_defaults_preset_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  d_model: 64\n  n_heads: 2\noptim:\n  lr: 0.01\n")
    cfg = config.load(f, "nano", ["optim.lr=3e-4"])
    assert cfg.model.d_model == 64          # file beats preset (nano has 192)
    assert cfg.model.n_layers == 4          # preset beats defaults
    assert cfg.optim.lr == pytest.approx(3e-4)  # --set beats file, and 3e-4 is typed as a float
    assert cfg.model.n_kv_heads == 2        # from the preset


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key `model.d_modle`") as exc:
        config.load(overrides=["model.d_modle=3"])
    assert exc.value.hint == "did you mean `model.d_model`?"


def test_unknown_key_in_file_names_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key `train.batchsize`") as exc:
        config.load(f)
    assert "train.batch_size" in exc.value.hint


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=-1", "`optim.lr` = -1"),
    ("train.batch_size=0", "`train.batch_size` = 0"),
    ("model.n_heads=5", "not divisible by n_heads=5"),
    ("model.n_kv_heads=3", "not divisible by n_kv_heads=3"),
    ("train.max_time=soon", "not a duration"),
    ("system.device=tpu", "`system.device` = 'tpu'"),
    ("optim.min_lr=1", "above lr"),
    ("optim.lr=1e6", "`optim.lr` = 1000000.0: Input should be less than or equal to 1"),
    ("optim.lr=1e39", "`optim.lr` = 1e+39: Input should be less than or equal to 1"),
    ("optim.lr=.nan", "`optim.lr` = nan: Input should be a finite number"),
    ("optim.grad_clip=.inf", "`optim.grad_clip` = inf: Input should be a finite number"),
    ("model.rope_theta=.inf", "`model.rope_theta` = inf: Input should be a finite number"),
    ("optim.eps=2", "`optim.eps` = 2"),
    ("model.init_std=5", "`model.init_std` = 5"),
    ("model.free.kl_weight={start: 0, end: .nan, steps: 10}", "Input should be a finite number"),
])
def test_bad_values_name_field_and_value(override, needle):
    with pytest.raises(ConfigError) as exc:
        config.load(overrides=[override])
    assert needle in exc.value.message


def test_bad_yaml_and_empty_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml`: .* at line"):
        config.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        config.load(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="unknown preset 'nanoo'") as exc:
        config.load(preset="nanoo")
    assert "`nano`" in exc.value.hint


@pytest.mark.parametrize("arch", config.ARCHS)
def test_to_yaml_round_trips_and_documents_every_field(tmp_path, arch):
    cfg = config.load(preset="tiny", overrides=["optim.betas=[0.8, 0.9]", "train.max_time=90s", f"model.arch={arch}",
                                                "model.rope_scaling.factor=32"])
    assert cfg.model.rope_scaling.factor == 32 and cfg.model.rope_scaling.original_context_length == 8192
    text = config.to_yaml(cfg, "header")
    f = tmp_path / "out.yaml"
    f.write_text(text)
    assert config.load(f) == cfg
    others = {f"model.{a}" for a in config.VARIANT_SECTIONS if a != arch}
    shown = [p for p in config.field_paths() if not any(p == o or p.startswith(o + ".") for o in others)]
    for path in shown:
        leaf = path.rsplit(".", 1)[-1]
        assert f"{leaf}:" in text
    for other in others:
        assert f"  {other.split('.')[1]}:" not in text
    indented_comments = [line for line in text.splitlines() if line.startswith("  ") and line.strip().startswith("# ")]
    assert len(indented_comments) == sum(1 for p in shown if "." in p)  # one description per field


def test_variant_sections_default_when_chosen_and_refused_for_another_arch():
    cfg = config.load(preset="nano", overrides=["model.arch=mod"])
    assert cfg.model.mod == config.MoDConfig() and cfg.model.mod.capacity == 0.125 and cfg.model.variant is cfg.model.mod
    assert cfg.model.dtf is None and cfg.model.free is None and cfg.model.mhc is None
    assert config.load(preset="nano").model.variant is None
    with pytest.raises(ConfigError, match=r"model.mod is set but model.arch is llama.*set model.arch=mod"):
        config.load(preset="nano", overrides=["model.mod.capacity=0.5"])
    with pytest.raises(ConfigError, match="n_layers=3 must be even"):
        config.load(overrides=["model.arch=dtf", "model.n_layers=3"])
    with pytest.raises(ConfigError, match=r"unknown key `model.mod.capcity`") as exc:
        config.load(overrides=["model.arch=mod", "model.mod.capcity=0.5"])
    assert exc.value.hint == "did you mean `model.mod.capacity`?"


@pytest.mark.parametrize("d_model,bits", [(192, 8), (512, 12), (1024, 16)])
def test_free_latent_bits_default_follows_model_width(d_model, bits):
    cfg = config.load(overrides=["model.arch=free", f"model.d_model={d_model}", "model.n_heads=4"])
    assert cfg.model.free.latent_bits == bits
    assert config.load(overrides=["model.arch=free", "model.free.latent_bits=4"]).model.free.latent_bits == 4


def test_linear_schedules_and_curriculum():
    cfg = config.load(overrides=["model.arch=free", "model.free.kl_weight={start: 0, end: 1, steps: 100}",
                                 "train.curriculum=[{step: 0, context_length: 64}, {step: 50, kl_weight: 0.5}]"])
    kl = cfg.model.free.kl_weight
    assert [config.schedule_at(kl, s) for s in (0, 25, 100, 500)] == [0.0, 0.25, 1.0, 1.0]
    assert config.schedule_at(cfg.model.free.free_bits, 7) == 0.5
    assert cfg.train.phase_at(10)[0] == 0 and cfg.train.phase_at(60)[1].model_overrides() == {"kl_weight": 0.5}
    assert config.load(overrides=["train.curriculum=[{step: 5, context_length: 64}]"]).train.phase_at(4) == (-1, None)
    with pytest.raises(ConfigError, match=r"train.curriculum\[0\].kl_weight applies to arch=free only"):
        config.load(overrides=["train.curriculum=[{step: 0, kl_weight: 0.5}]"])
    with pytest.raises(ConfigError, match="above model.context_length=256"):
        config.load(overrides=["train.curriculum=[{step: 0, context_length: 512}]"])
    with pytest.raises(ConfigError, match="must be distinct and increasing"):
        config.load(overrides=["train.curriculum=[{step: 10}, {step: 5}]"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        config.load(overrides=["model.arch=free", "model.free.free_bits=-1"])


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("5m", 300), ("2h", 7200), ("1h30m", 5400), (45, 45)])
def test_parse_duration(text, seconds):
    assert config.parse_duration(text) == seconds


def test_presets_sizes_are_ordered_and_in_range():
    names = config.list_presets()
    assert names[:5] == ["nano", "tiny", "small", "medium", "large"]
    params = [config.count_params(config.load(preset=n).model, 50304) for n in names[:5]]
    assert params == sorted(params)
    nano, tiny, small, medium, large = params
    assert config.count_params(config.load(preset="nano").model, 4096) < 5e6
    assert 20e6 < config.count_params(config.load(preset="tiny").model, 4096) < 30e6
    assert 110e6 < small < 140e6 and 300e6 < medium < 400e6 and 1.1e9 < large < 1.5e9


def test_ffn_dim_and_kv_heads_defaults():
    m = config.ModelConfig(d_model=192, n_heads=6)
    assert m.ffn_dim == 512 and m.kv_heads == 6 and m.head_size == 32
    assert config.padded_vocab(4000) == 4032 and config.padded_vocab(4096) == 4096
