"""Every config model tfkit has, and the one way to build a config: :func:`load`.

Precedence, lowest first: field defaults, a preset (``presets/<name>.yaml``), a YAML file,
``--set key=value`` overrides. Every field carries a ``description`` that ``--help`` and
``tfkit config init`` show. Unknown keys are rejected with the closest valid key.

Imports pydantic, PyYAML and the standard library only, so commands that need no model start fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tfkit.errors import ConfigError
from tfkit.paths import presets_dir

ARCHS = ("llama", "mod", "dtf", "free", "mhc")
"""Values of ``model.arch`` that the model registry implements."""

ARCH_HELP = {
    "llama": "Llama-style baseline: RoPE, RMSNorm, GQA, SwiGLU (arXiv 2302.13971)",
    "mod": "Mixture-of-Depths: top-k token routing in every other block (arXiv 2404.02258)",
    "dtf": "Dynamic Transformer: surprise-routed decision/dynamic layer pairs (arXiv 2511.21408)",
    "free": "Free Transformer: per-token binary latent injected at the middle layer (arXiv 2510.17558)",
    "mhc": "mHC: manifold-constrained hyper-connections, n residual streams (arXiv 2512.24880)",
}
"""One line per ``model.arch``: what it is and its source."""


class _Section(BaseModel):
    # NaN/Inf are refused in every float field: a NaN learning rate would train silently into NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LinearSchedule(_Section):
    """A value that moves linearly from ``start`` to ``end`` over optimizer steps ``0..steps``, then stays."""

    start: float = Field(..., description="Value at step 0.")
    end: float = Field(..., description="Value from step `steps` on.")
    steps: int = Field(..., ge=1, description="Optimizer steps the change takes.")

    def at(self, step: int) -> float:
        """The value at optimizer step ``step`` (0-based)."""
        frac = min(1.0, max(0.0, step / self.steps))
        return self.start + (self.end - self.start) * frac


Schedule = Union[float, LinearSchedule]
"""A constant, or ``{start, end, steps}`` for a linear ramp (KL annealing, free-bits scheduling)."""


def schedule_at(value: Schedule, step: int) -> float:
    """The value of a :data:`Schedule` at optimizer step ``step``."""
    return value.at(step) if isinstance(value, LinearSchedule) else float(value)


class MoDConfig(_Section):
    """Mixture-of-Depths (Raposo et al., arXiv 2404.02258)."""

    capacity: float = Field(
        0.125, gt=0, le=1, description="Share of each sequence's tokens a routed block processes (gamma; top-k, k = capacity*T)."
    )
    every: int = Field(2, ge=1, description="Route every n-th block (2 = blocks 1, 3, 5...); the others are dense.")
    predictor_loss_weight: float = Field(
        0.01, ge=0, description="Weight of the causal predictor's BCE loss; the predictor routes tokens one by one at generation."
    )


class DTFConfig(_Section):
    """Dynamic Transformer with surprise-based routing (Wieser et al., arXiv 2511.21408)."""

    capacity_gamma: float = Field(0.5, gt=0, le=1, description="Share of tokens each dynamic layer processes (top-k of the gate).")
    beta_ce_init: float = Field(-0.3, description="Initial expected-event temperature, before softplus.")
    beta_cu_init: float = Field(-0.6, description="Initial unexpected-event temperature, before softplus.")
    cu_detection_multiplier_init: float = Field(
        1.1, description="Initial m_cu: a token is unexpected when its change exceeds m_cu times the moving average."
    )
    ce_criterion_offset_init: float = Field(1.025, gt=0, description="Initial o_ce, the expected-event offset (enters as log o_ce).")
    prior_ffn_intermediate_size_factor: float = Field(
        0.0625, gt=0, le=8, description="Width of the prior FFN as a share of d_model (0.0625 gave the best loss in the thesis)."
    )
    prior_loss_weight: float = Field(0.05, ge=0, description="Weight of the prior's MSE loss towards the posterior (stops routing collapse).")
    ma_window: int = Field(100, ge=1, description="Tokens in the causal moving average of the unexpected-event criterion.")
    router_loss_weight: float = Field(
        0.01, ge=0, description="Weight of the causal router's BCE loss; the causal router routes tokens at generation."
    )


def default_latent_bits(d_model: int) -> int:
    """Latent bits H for ``model.free.latent_bits`` left empty: 16 from d_model 1024, 12 from 512, else 8.

    The binary mapper is dense over 2^H values (B*T*2^H floats), too much for small models at H = 16.
    """
    return 16 if d_model >= 1024 else 12 if d_model >= 512 else 8


class FreeConfig(_Section):
    """Free Transformer (Fleuret, arXiv 2510.17558)."""

    latent_bits: Optional[int] = Field(
        None, ge=1, le=16, description="Bits H of the per-token latent (2^H values); empty = 16 for d_model >= 1024, 12 from 512, else 8."
    )
    kl_weight: Schedule = Field(
        1.0, description="Weight of the KL term: a number, or {start, end, steps} for linear KL annealing."
    )
    free_bits: Schedule = Field(
        0.5, description="Free bits kappa per token (bits): KL below it is not penalised; a number or {start, end, steps}."
    )
    inject_layer: Optional[int] = Field(
        None, ge=1, description="Blocks before the latent is injected; empty = n_layers // 2."
    )

    @field_validator("kl_weight", "free_bits")
    @classmethod
    def _non_negative(cls, v: Schedule) -> Schedule:
        vals = (v.start, v.end) if isinstance(v, LinearSchedule) else (v,)
        if any(x < 0 for x in vals):
            raise ValueError("must be >= 0")
        return v


class MHCConfig(_Section):
    """Manifold-constrained hyper-connections (DeepSeek, arXiv 2512.24880; Zhu et al., arXiv 2409.19606)."""

    enabled: bool = Field(True, description="false = the plain single-stream residual model (for ablations).")
    n_streams: int = Field(4, ge=1, le=16, description="Residual streams n.")
    sinkhorn_iters: int = Field(20, ge=1, description="Sinkhorn-Knopp iterations that make H_res doubly stochastic.")
    alpha_init: float = Field(0.01, ge=0, description="Initial scale of the token-dependent part of H_pre, H_post, H_res.")


class RopeScaling(_Section):
    """RoPE frequency scaling for long contexts; only Llama 3.1's ``llama3`` rule (Meta, "The Llama 3
    Herd of Models", arXiv 2407.21783): wavelengths longer than ``original_context_length /
    low_freq_factor`` are stretched by ``factor``, those shorter than ``original_context_length /
    high_freq_factor`` are kept, and the band between is interpolated."""

    type: Literal["llama3"] = Field("llama3", description="Scaling rule; only llama3 (Llama 3.1/3.2).")
    factor: float = Field(8.0, gt=0, description="How much the long wavelengths are stretched.")
    low_freq_factor: float = Field(1.0, gt=0, description="Wavelengths above original_context_length / low_freq_factor are stretched by factor.")
    high_freq_factor: float = Field(4.0, gt=0, description="Wavelengths below original_context_length / high_freq_factor are kept.")
    original_context_length: int = Field(8192, ge=1, description="Context length the model was pretrained with before scaling (tokens).")

    @model_validator(mode="after")
    def _bands(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor={self.high_freq_factor} must exceed low_freq_factor={self.low_freq_factor}")
        return self


VARIANT_SECTIONS = {"mod": MoDConfig, "dtf": DTFConfig, "free": FreeConfig, "mhc": MHCConfig}
"""``model.arch`` -> the class of its nested config section ``model.<arch>``."""


class ModelConfig(_Section):
    """Shape of the decoder. Field names follow the field's standard terms."""

    arch: Literal["llama", "mod", "dtf", "free", "mhc"] = Field(
        "llama", description="Model variant: llama, mod (Mixture-of-Depths), dtf (Dynamic Transformer), "
        "free (Free Transformer) or mhc (hyper-connections). `tfkit list-models --archs` describes each."
    )
    vocab_size: Optional[int] = Field(
        None, ge=2, description="Vocabulary size; empty = follow the tokenizer, rounded up to a multiple of 64."
    )
    d_model: int = Field(256, ge=8, description="Width of the residual stream (hidden size).")
    n_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Attention query heads; d_model must divide by it.")
    n_kv_heads: Optional[int] = Field(
        None, ge=1, description="Key/value heads for grouped-query attention; empty = n_heads (plain multi-head)."
    )
    d_ff: Optional[int] = Field(
        None, ge=1, description="Hidden width of the feed-forward block; empty = 8/3 * d_model rounded up to 64."
    )
    context_length: int = Field(256, ge=2, description="Longest sequence the model sees, in tokens.")
    head_dim: Optional[int] = Field(
        None, ge=2, description="Width of each attention head; empty = d_model / n_heads (Qwen3 sets it apart)."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (theta).")
    rope_scaling: Optional[RopeScaling] = Field(
        None, description="RoPE frequency scaling for long contexts (Llama 3.1's llama3 rule); empty = none."
    )
    attention_bias: bool = Field(
        False, description="Biases on the query, key and value projections (Qwen2 / Qwen2.5 style)."
    )
    norm_eps: float = Field(1e-5, gt=0, le=1, description="Epsilon of every RMSNorm.")
    ffn: Literal["swiglu", "geglu"] = Field("swiglu", description="Feed-forward gate: swiglu (SiLU) or geglu (GELU).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output head.")
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys before RoPE (OLMo 2 / Qwen3 style).")
    init_std: float = Field(
        0.02, gt=0, le=1, description="Std of weight init; residual output projections use init_std/sqrt(2*n_layers)."
    )
    mod: Optional[MoDConfig] = Field(None, description="Mixture-of-Depths settings (arch=mod only).")
    dtf: Optional[DTFConfig] = Field(None, description="Dynamic Transformer settings (arch=dtf only).")
    free: Optional[FreeConfig] = Field(None, description="Free Transformer settings (arch=free only).")
    mhc: Optional[MHCConfig] = Field(None, description="Hyper-connection settings (arch=mhc only).")

    @model_validator(mode="after")
    def _variant_section(self) -> "ModelConfig":
        for name in VARIANT_SECTIONS:
            if name != self.arch and getattr(self, name) is not None:
                raise ValueError(f"model.{name} is set but model.arch is {self.arch}; "
                                 f"remove the `{name}:` section or set model.arch={name}")
        if self.arch in VARIANT_SECTIONS and getattr(self, self.arch) is None:
            object.__setattr__(self, self.arch, VARIANT_SECTIONS[self.arch]())
        if self.arch == "free":
            fc = self.free
            if fc.latent_bits is None:
                object.__setattr__(fc, "latent_bits", default_latent_bits(self.d_model))
            if self.n_layers < 2:
                raise ValueError("arch=free needs n_layers >= 2 (the latent enters between two halves)")
            if fc.inject_layer is not None and fc.inject_layer >= self.n_layers:
                raise ValueError(f"model.free.inject_layer={fc.inject_layer} must be below n_layers={self.n_layers}")
        if self.arch == "dtf" and self.n_layers % 2:
            raise ValueError(f"arch=dtf pairs its layers (decision, dynamic): n_layers={self.n_layers} must be even")
        return self

    @property
    def variant(self) -> Optional[_Section]:
        """The nested section of this arch (``model.mod`` for arch=mod...), None for llama."""
        return getattr(self, self.arch, None) if self.arch in VARIANT_SECTIONS else None

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.head_dim is not None:
            if self.head_dim % 2:
                raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        elif self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "set model.head_dim to size the heads apart from d_model")
        elif (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim = d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={kv}")
        return self

    @property
    def head_size(self) -> int:
        """``head_dim`` resolved: d_model / n_heads when unset."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """``n_kv_heads`` resolved (``n_heads`` when unset)."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        """``d_ff`` resolved: 8/3 * d_model rounded up to a multiple of 64 when unset."""
        if self.d_ff:
            return self.d_ff
        return int(math.ceil(8 * self.d_model / 3 / 64) * 64)


class DataConfig(_Section):
    """Where the training data comes from. Empty paths mean the bundled Shakespeare corpus."""

    train: Optional[str] = Field(None, description="Prepared token file for training (`tfkit prepare`); empty = bundled corpus.")
    val: Optional[str] = Field(
        None, description="Prepared token file for validation; empty = hold out the end of the train file."
    )
    tokenizer: Optional[str] = Field(None, description="tokenizer.json that made the token files (`tfkit tokenize`).")
    val_fraction: float = Field(
        0.05, gt=0, lt=1, description="Share of train tokens held out for validation when no val file is given."
    )
    default_vocab_size: int = Field(4096, ge=300, description="Vocab size of the tokenizer trained for the bundled corpus.")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Tokens the loss counts in conversation data (`messages` records): assistant = the "
        "assistant turns only (torchtune's train_on_assistant); all = every token. Plain text always counts every token."
    )


class OptimConfig(_Section):
    """AdamW and the learning-rate schedule (warmup, then the chosen decay)."""

    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate, reached at the end of warmup (at most 1).")
    min_lr: float = Field(1e-4, ge=0, description="Learning rate at the end of the decay.")
    warmup_steps: int = Field(100, ge=0, description="Optimizer steps of linear warmup from 0 to lr.")
    schedule: Literal["cosine", "cosine_restarts", "constant"] = Field(
        "cosine", description="Decay after warmup: cosine, cosine_restarts or constant."
    )
    restarts: int = Field(3, ge=1, description="Number of cosine cycles for schedule=cosine_restarts.")
    weight_decay: float = Field(0.1, ge=0, le=1, description="AdamW decoupled weight decay (matrices only; not norms or biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW beta1, beta2.")
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient L2 norm to this; 0 = no clipping.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must lie in [0, 1)")
        return v

    @model_validator(mode="after")
    def _min_below_peak(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}")
        return self


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(value: Any) -> Optional[float]:
    """Seconds in a duration such as ``90``, ``90s``, ``5m``, ``2h``, ``1h30m``; ``None`` stays ``None``.

    Raises:
        ValueError: the text is not a duration.
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be positive")
        return float(value)
    text = str(value).strip().lower()
    m = _DURATION.match(text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"{value!r} is not a duration; use e.g. 90s, 5m, 2h or 1h30m")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


class CurriculumPhase(_Section):
    """One phase of ``train.curriculum``: from optimizer step ``step`` on, train with these settings."""

    step: int = Field(..., ge=0, description="First optimizer step of the phase.")
    context_length: Optional[int] = Field(
        None, ge=2, description="Training sequence length in this phase; empty = model.context_length."
    )
    kl_weight: Optional[float] = Field(
        None, ge=0, description="arch=free only: KL weight in this phase (overrides model.free.kl_weight)."
    )

    def model_overrides(self) -> dict[str, float]:
        """The settings this phase hands to the model's ``set_progress`` (only those it sets)."""
        return {} if self.kl_weight is None else {"kl_weight": self.kl_weight}


class TrainConfig(_Section):
    """The training loop: batch, length, evaluation and checkpoints."""

    batch_size: int = Field(16, ge=1, description="Micro-batch size in sequences.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_steps: int = Field(2000, ge=1, description="Optimizer steps to train for.")
    max_time: Optional[str] = Field(
        None,
        description="Wall-clock budget (90s, 5m, 2h); the schedule is fitted to it and training stops when it runs out.",
    )
    log_interval: int = Field(10, ge=1, description="Steps between log lines / metrics records.")
    eval_interval: int = Field(250, ge=0, description="Steps between evaluations; 0 = only at the end.")
    eval_steps: int = Field(20, ge=1, description="Batches per evaluation.")
    ckpt_interval: int = Field(500, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    keep_last: int = Field(2, ge=1, description="Newest checkpoints kept (the best by val loss is kept as well).")
    curriculum: list[CurriculumPhase] = Field(
        default_factory=list,
        description="Phases that change context_length (and, for arch=free, kl_weight) from a given step, "
        "e.g. [{step: 0, context_length: 64}, {step: 500, context_length: 256}]; empty = no curriculum.",
    )

    @field_validator("curriculum")
    @classmethod
    def _phases_in_order(cls, v: list[CurriculumPhase]) -> list[CurriculumPhase]:
        steps = [p.step for p in v]
        if steps != sorted(set(steps)):
            raise ValueError(f"phase steps {steps} must be distinct and increasing")
        return v

    def phase_at(self, step: int) -> tuple[int, Optional[CurriculumPhase]]:
        """Index and phase of the curriculum in force at optimizer step ``step`` ((-1, None) before any)."""
        found: tuple[int, Optional[CurriculumPhase]] = (-1, None)
        for i, phase in enumerate(self.curriculum):
            if phase.step <= step:
                found = (i, phase)
        return found

    @field_validator("max_time")
    @classmethod
    def _valid_duration(cls, v: Optional[str]) -> Optional[str]:
        parse_duration(v)
        return None if v in (None, "") else str(v)

    @property
    def max_time_s(self) -> Optional[float]:
        """``max_time`` in seconds (``None`` when unset)."""
        return parse_duration(self.max_time)


class SystemConfig(_Section):
    """Hardware choices; `auto` lets `tfkit.hardware` decide and say why."""

    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device: auto, cpu, cuda or mps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Numeric precision: auto, fp32, bf16 (autocast) or fp16 (autocast + grad scaler)."
    )
    compile: Literal["auto", "true", "false"] = Field("auto", description="torch.compile the model: auto, true or false.")
    attention: Literal["auto", "sdpa", "flash", "eager"] = Field(
        "auto", description="Attention kernel: auto, sdpa (PyTorch), flash (flash-attn) or eager (reference)."
    )
    seed: int = Field(0, ge=0, description="Random seed for init, data order and dropout.")
    grad_checkpointing: bool = Field(False, description="Recompute block activations in backward to save memory.")
    distributed: Literal["auto", "ddp", "fsdp", "none"] = Field(
        "auto", description="With several processes (torchrun): auto (DDP when the model and its AdamW state fit "
                            "on one device, else FSDP2), ddp, fsdp (shard weights, gradients and optimizer state), "
                            "or none (one process only).")

    @field_validator("compile", mode="before")
    @classmethod
    def _bool_to_text(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v


class RunConfig(_Section):
    """A whole run: model, data, optimizer, training loop and system."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation data.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    system: SystemConfig = Field(default_factory=SystemConfig, description="Device, precision and kernels.")

    @model_validator(mode="after")
    def _curriculum_fits_model(self) -> "RunConfig":
        for i, phase in enumerate(self.train.curriculum):
            if phase.context_length is not None and phase.context_length > self.model.context_length:
                raise ValueError(f"train.curriculum[{i}].context_length={phase.context_length} is above "
                                 f"model.context_length={self.model.context_length}")
            if phase.kl_weight is not None and self.model.arch != "free":
                raise ValueError(f"train.curriculum[{i}].kl_weight applies to arch=free only (arch is {self.model.arch})")
        return self

    def fingerprint(self) -> str:
        """Short SHA-256 of the resolved config (JSON), to tell whether two runs agree."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading


def list_presets() -> list[str]:
    """Names of the presets shipped in ``presets/`` (without ``.yaml``), sorted by size."""
    order = ["nano", "tiny", "small", "medium", "large", "xl"]
    names = [p.stem for p in presets_dir().glob("*.yaml")]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def preset_dict(name: str) -> dict[str, Any]:
    """The nested dict a preset sets.

    Raises:
        ConfigError: no preset of that name.
    """
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, list_presets(), n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise ConfigError(
            f"unknown preset {name!r}",
            f"{hint}presets: {', '.join(list_presets() + ['auto'])}",
        )
    return _read_yaml(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file `{path}` does not exist", "check the path, or write one with `tfkit config init`")
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"`{path}`: {problem}{where}", "fix the YAML syntax, or regenerate with `tfkit config init`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config `{path}`: {exc}", "check the file's permissions and encoding") from None
    if data is None:
        raise ConfigError(f"config file `{path}` is empty", "write a config with `tfkit config init --force`")
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}` must hold a mapping of sections (model:, train:, ...), not {type(data).__name__}",
                          "see `tfkit config init` for the layout")
    return data


def field_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted field path of a config model, sections included (``model``, ``model.d_model``...)."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        section = _section_type(info.annotation)
        if section is not None:
            out.extend(field_paths(section, path + "."))
    return out


def _section_type(ann: Any) -> Optional[type[BaseModel]]:
    """The config class behind ``X`` or ``Optional[X]`` when X is a section (not a list or a union of values)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel) and not getattr(ann, "__origin__", None) is list:
        return args[0]
    return None


def _suggest(path: str) -> str:
    close = difflib.get_close_matches(path, field_paths(), n=1, cutoff=0.5)
    if not close:
        leaf = path.rsplit(".", 1)[-1]
        close = [p for p in field_paths() if p.rsplit(".", 1)[-1] == leaf][:1]
    return f"did you mean `{close[0]}`?" if close else "run `tfkit config init` to see every valid key"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its path and a YAML-typed value (``1e-3`` -> float).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value", "write e.g. `--set optim.lr=3e-4`")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key", "write e.g. `--set optim.lr=3e-4`")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    return key.split("."), value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def validate(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from a nested dict.

    Raises:
        ConfigError: naming each bad dotted field, its value and the problem, with a suggestion
            for unknown keys.
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems, hint = [], "run `tfkit config init` to see every field with its description"
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key `{loc}`")
                hint = _suggest(loc)
            else:
                msg = err["msg"].removeprefix("Value error, ")
                value = err.get("input")
                shown = "" if isinstance(value, dict) else f" = {value!r}"
                problems.append(f"`{loc}`{shown}: {msg}" if loc else msg)
        raise ConfigError(f"{source}: " + "; ".join(problems), hint) from None


def load(file: Optional[str | Path] = None, preset: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Resolve a config: defaults < preset < file < ``--set`` overrides.

    Args:
        file: a YAML config (``tfkit config init`` writes one).
        preset: a preset name from :func:`list_presets` (``auto`` must be resolved by the caller).
        overrides: ``section.key=value`` strings, typed like YAML.

    Raises:
        ConfigError: unknown preset, unreadable/malformed YAML, unknown key or invalid value.
    """
    data: dict[str, Any] = {}
    source = "config"
    if preset:
        data = _merge(data, preset_dict(preset))
        source = f"preset `{preset}`"
    if file:
        data = _merge(data, _read_yaml(Path(file)))
        source = f"`{file}`"
    for text in overrides or []:
        keys, value = parse_override(text)
        if ".".join(keys) not in field_paths():
            raise ConfigError(f"unknown key `{'.'.join(keys)}` in --set {text!r}", _suggest(".".join(keys)))
        _set_path(data, keys, value)
        source = "--set overrides" if not file else f"`{file}` with --set overrides"
    return validate(data, source)


# ---------------------------------------------------------------------------------------------
# Estimates (pure arithmetic, used by --preset auto and the dashboard)


def padded_vocab(vocab_size: int) -> int:
    """A tokenizer's vocab size rounded up to a multiple of 64 (for matmul efficiency)."""
    return int(math.ceil(vocab_size / 64) * 64)


def count_params(m: ModelConfig, vocab_size: Optional[int] = None) -> int:
    """Parameters of a llama-style model of this shape (embedding counted once when tied)."""
    v = m.vocab_size or vocab_size or 4096
    d, hd = m.d_model, m.head_size
    attn = d * (m.n_heads * hd) + 2 * d * (m.kv_heads * hd) + (m.n_heads * hd) * d
    attn += (m.n_heads + 2 * m.kv_heads) * hd if m.attention_bias else 0
    ffn = 3 * d * m.ffn_dim
    norms = 2 * d + (2 * hd if m.qk_norm else 0)
    emb = v * d * (1 if m.tie_embeddings else 2)
    return m.n_layers * (attn + ffn + norms) + emb + d


def flops_per_token(m: ModelConfig, vocab_size: Optional[int] = None) -> float:
    """Training FLOPs per token: 6*N (matmul weights, head included) + 12*L*d*T attention (PaLM, arXiv 2204.02311)."""
    v = m.vocab_size or vocab_size or 4096
    n = count_params(m, v) - v * m.d_model * (1 if m.tie_embeddings else 2) + v * m.d_model
    return 6.0 * n + 12.0 * m.n_layers * m.d_model * m.context_length


CE_CHUNK_ELEMENTS = 1 << 26
"""Logits (B*T*V elements) above which the cross-entropy upcasts to fp32 one chunk of rows at a
time (``tfkit.models.base.cross_entropy``): 64M elements, 256 MiB in fp32."""

CUDA_CONTEXT_BYTES = 1 << 30
"""What a CUDA process holds before any tensor: the context, cuBLAS/cuDNN workspaces (about 1 GiB)."""


def estimate_train_memory(cfg: RunConfig, bytes_per_activation: int = 4, vocab_size: Optional[int] = None,
                          device_type: str = "cuda", attention: str = "sdpa", batch_size: Optional[int] = None,
                          grad_checkpointing: Optional[bool] = None, shards: int = 1) -> dict[str, int]:
    """Bytes that live on the device while training, by kind.

    - ``weights``, ``grads``, ``optimizer``: fp32 master weights, gradients and the two AdamW
      moments (4 + 4 + 8 bytes per parameter), divided by ``shards`` under FSDP2.
    - ``autocast_cache``: the bf16/fp16 copy of the weights autocast keeps during a step (2 bytes
      per parameter at 2-byte activations).
    - ``activations``: what backward keeps per layer for each token, counted for this block
      (RMSNorm inputs in fp32, the norm outputs, q/k/v, the attention output and its log-sum-exp,
      the FFN's two up-projections, their activation and product): ``10*d + 4*d_ff + 2*kv_dim``
      elements. No T x T attention scores with SDPA or flash (they are recomputed in backward); the
      eager kernel keeps scores and probabilities. With grad checkpointing a layer keeps its input
      only, and one layer's activations exist at a time during its recomputation (Korthikanti et
      al., arXiv 2205.05198, for the method).
    - ``logits``: the logits and their gradient in the compute dtype, and the fp32 upcast, its
      log-softmax and gradient for the whole batch, or for one chunk of
      :data:`CE_CHUNK_ELEMENTS` when the batch's logits are larger.
    - ``context``: :data:`CUDA_CONTEXT_BYTES` on CUDA.

    Args:
        batch_size, grad_checkpointing: override the config's (to try micro-batches).

    Returns:
        dict of those keys (bytes) plus ``params`` and ``total``.
    """
    m, t = cfg.model, cfg.train
    v = m.vocab_size or vocab_size or 4096
    n = count_params(m, v)
    act = bytes_per_activation
    b = batch_size or t.batch_size
    ckpt = cfg.system.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    tokens, d = b * m.context_length, m.d_model
    per_token = (10 * d + 4 * m.ffn_dim + 2 * m.kv_heads * m.head_size) * act + 2 * d * 4
    if attention == "eager":
        per_token += 2 * m.n_heads * m.context_length * act  # scores and probabilities, (B, h, T, T)
    layer = tokens * per_token
    acts = m.n_layers * tokens * d * act + layer if ckpt else m.n_layers * layer
    rows = tokens * v
    logits = 2 * rows * act + 3 * 4 * min(rows, CE_CHUNK_ELEMENTS)
    out = {"params": n, "weights": 4 * n // shards, "grads": 4 * n // shards, "optimizer": 8 * n // shards,
           "autocast_cache": 2 * n if act == 2 else 0, "activations": int(acts), "logits": int(logits),
           "context": CUDA_CONTEXT_BYTES if device_type == "cuda" else 0}
    out["total"] = sum(v for k, v in out.items() if k != "params")
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        value = [v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel) else v for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def to_yaml(cfg: RunConfig, header: str = "") -> str:
    """The config as YAML, every field preceded by its description as a comment.

    The text loads back to an equal config with :func:`load`.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for sec_name, sec_info in RunConfig.model_fields.items():
        section = getattr(cfg, sec_name)
        if lines:
            lines.append("")
        lines.append(f"# {sec_info.description}")
        lines.append(f"{sec_name}:")
        _section_lines(section, lines, "  ")
    return "\n".join(lines) + "\n"


def _section_lines(section: BaseModel, lines: list[str], indent: str) -> None:
    """Append ``# description`` / ``name: value`` lines for each field; nested sections that are set
    (``model.mod`` for arch=mod) become indented blocks, unset ones are left out."""
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if _section_type(info.annotation) is not None and not isinstance(value, LinearSchedule):
            if value is None:
                continue
            lines.append(f"{indent}# {info.description}")
            lines.append(f"{indent}{name}:")
            _section_lines(value, lines, indent + "  ")
            continue
        lines.append(f"{indent}# {info.description}")
        lines.append(f"{indent}{name}: {_yaml_scalar(value)}".rstrip())
