"""Hugging Face model folders in and out: Llama, Mistral, Qwen2/Qwen2.5 and Qwen3 decoders.

A folder holds ``config.json``, the weights (``model.safetensors`` or shards named by
``model.safetensors.index.json``), ``tokenizer.json``, ``tokenizer_config.json`` and
``generation_config.json``. :func:`read_model` maps the config to a :class:`~tfkit.config.ModelConfig`
and the tensors to tfkit's names; :func:`write_model` does the reverse for a ``llama`` run.

The one non-trivial mapping is RoPE's layout. tfkit rotates interleaved pairs ``(x[2k], x[2k+1])``
(RoFormer, arXiv 2104.09864); Hugging Face's Llama code rotates halves ``(x[k], x[k + D/2])``. Both
turn pair k by the same angle, so permuting the rows of each head of ``q_proj``/``k_proj`` (and their
biases and QK-norm gains) from one order to the other gives the same attention scores exactly
(q·k is unchanged by a permutation applied to both). ``v_proj``/``o_proj`` are not touched.

Nothing is loaded that would be wrong: a mixture of experts, sliding-window attention, an MLP or
output bias, an unknown ``rope_scaling`` or activation is refused with the field that says so.
Only safetensors weights are read (``pytorch_model.bin`` is a pickle that can run code).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from tfkit.config import ModelConfig, RopeScaling
from tfkit.errors import CheckpointError, ConfigError, DataError, TfkitError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""``model_type`` values that :func:`read_model` accepts."""
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""The ``architectures`` entry :func:`write_model` writes for each family it exports."""
INSTALL_HINT = "install the Hugging Face extra: `pip install 'tfkit[hf]'`"
MAX_SHARD_BYTES = 5 * 1024**3
"""Default largest ``model-0000x-of-0000y.safetensors`` file of an export (as transformers)."""
DEFAULT_IMPORT_CONTEXT = 2048
"""``model.context_length`` of an import when the model allows more (raise it with ``--context-length``)."""
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Jinja chat template of tfkit's own tokenizers (the text :func:`tfkit.data.tokenizer.render_conversation` writes)."""


class UnsupportedModel(ConfigError):
    """A Hugging Face model tfkit cannot represent exactly (exit 2)."""


def _refuse(folder: Path, what: str, hint: str = "") -> UnsupportedModel:
    return UnsupportedModel(f"`{folder / 'config.json'}`: {what}",
                            hint or f"tfkit imports dense {', '.join(FAMILIES)} models with full attention")


# ---------------------------------------------------------------------------------------------
# Finding the folder


def find_source(source: str, download: bool = False, on_status: Callable[[str], None] = lambda s: None) -> Path:
    """The model folder ``source`` names: a local folder, or a repo id (``Qwen/Qwen2.5-0.5B``) looked up
    in the local Hugging Face cache (``HF_HUB_CACHE``), and downloaded there when ``download``.

    Raises:
        DataError: the path is a file, the repo is not cached (or cannot be downloaded), or
            ``source`` is neither a folder nor a repo id.
        TfkitError: ``huggingface_hub`` is needed and not installed.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"`{source}` is a file, not a model folder",
                        "pass the folder that holds config.json and the safetensors weights")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
        raise DataError(f"`{source}` is neither a folder nor a Hugging Face repo id",
                        "pass a folder with config.json, or a repo id such as `Qwen/Qwen2.5-0.5B`")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise TfkitError(f"`{source}` looks like a Hugging Face repo id, and reading the cache needs huggingface_hub",
                         INSTALL_HINT) from None
    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        return Path(snapshot_download(source, local_files_only=True, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        if not download:
            raise DataError(f"`{source}` is not in the local Hugging Face cache (`{constants.HF_HUB_CACHE}`)",
                            f"download it with `tfkit import {source} --download` (needs the internet), "
                            "or pass the model's folder") from None
    except Exception as exc:  # noqa: BLE001 - a broken cache entry: say so, never a traceback
        raise DataError(f"cannot read `{source}` from the Hugging Face cache ({exc})",
                        "pass the model's folder instead") from None
    on_status(f"downloading `{source}` from the Hugging Face Hub")
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated model...
        raise DataError(f"cannot download `{source}` ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                        "check the repo id and the network (this machine may be offline); "
                        "or pass a folder you copied here") from None


# ---------------------------------------------------------------------------------------------
# Import


@dataclass
class HFModel:
    """A Hugging Face folder read for import.

    Attributes:
        folder: the model folder.
        family: its ``model_type`` (one of :data:`FAMILIES`).
        model: the :class:`ModelConfig` of the same network (``arch=llama``).
        max_positions: ``max_position_embeddings`` (tokens).
        dtype: the dtype of the stored weights (``torch_dtype``/``dtype``), e.g. ``"bfloat16"``.
        weight_files: the safetensors files.
        tied: the output head is the embedding.
    """

    folder: Path
    family: str
    model: ModelConfig
    max_positions: int
    dtype: str
    weight_files: list[Path]
    tied: bool
    config: dict[str, Any] = field(repr=False, default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"`{path}` is missing", "a Hugging Face model folder holds config.json and the weights") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"`{path}` is not valid JSON ({exc})", "re-download or re-save the model") from None
    if not isinstance(data, dict):
        raise DataError(f"`{path}` is not a JSON object", "re-download or re-save the model")
    return data


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards the index names, or ``model.safetensors``.

    Raises:
        DataError: no safetensors weights (a ``pytorch_model.bin`` alone is refused, it is a pickle).
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if not names or missing:
            raise DataError(f"`{index}` names shards that are missing: {', '.join(missing[:3]) or 'none listed'}",
                            "re-download the model (all of its model-0000x-of-0000y.safetensors files)")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise DataError(f"`{folder}` has only PyTorch pickle weights (*.bin), no safetensors",
                        "convert them once with transformers: `AutoModelForCausalLM.from_pretrained(DIR)"
                        ".save_pretrained(DIR)` writes model.safetensors")
    raise DataError(f"`{folder}` holds no weights (no model.safetensors or model.safetensors.index.json)",
                    "pass the folder that holds the model's safetensors files")


def _rope(cfg: dict[str, Any], folder: Path) -> tuple[float, Optional[RopeScaling]]:
    """``rope_theta`` and the scaling of a config, in the layout of transformers 4 (``rope_theta`` +
    ``rope_scaling``) or 5 (``rope_parameters``)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5
        theta, scaling = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), params
    else:
        theta, scaling = float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")
    if not scaling:
        return theta, None
    if not isinstance(scaling, dict):
        raise _refuse(folder, f"rope_scaling {scaling!r} is not an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise _refuse(folder, f"rope_scaling type `{kind}` is not supported (tfkit implements `llama3`)",
                      "import a model whose rope_scaling is llama3 or absent")
    try:
        return theta, RopeScaling(type="llama3", factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                                  high_freq_factor=scaling["high_freq_factor"],
                                  original_context_length=scaling["original_max_position_embeddings"])
    except KeyError as exc:
        raise _refuse(folder, f"rope_scaling of type llama3 lacks {exc}") from None
    except ValueError as exc:
        raise _refuse(folder, f"rope_scaling: {exc}") from None


def read_model(folder: Path, context_length: Optional[int] = None) -> HFModel:
    """Read a Hugging Face folder's config and check that tfkit can hold the network exactly.

    Args:
        folder: the model folder.
        context_length: tokens per training sequence of the tfkit run; default
            ``min(max_position_embeddings, DEFAULT_IMPORT_CONTEXT)``.

    Raises:
        UnsupportedModel: another family, a mixture of experts, sliding-window attention, MLP or
            output biases, an unknown activation or ``rope_scaling`` (naming the field).
        DataError: config.json or the weights are missing or unreadable.
    """
    cfg = _read_json(folder / "config.json")
    family = cfg.get("model_type")
    for key in _MOE_FIELDS:
        if cfg.get(key):
            raise _refuse(folder, f"`{key}` = {cfg[key]}: a mixture-of-experts model cannot be imported",
                          f"tfkit imports dense {', '.join(FAMILIES)} models")
    if family not in FAMILIES:
        raise _refuse(folder, f"model_type `{family}` is not supported (supported: {', '.join(FAMILIES)})")
    if family == "mistral" and cfg.get("sliding_window") is not None:
        raise _refuse(folder, f"sliding_window = {cfg['sliding_window']}: sliding-window attention is not supported",
                      "import a Mistral whose config has `\"sliding_window\": null` (v0.2 and later)")
    if cfg.get("use_sliding_window"):
        raise _refuse(folder, "use_sliding_window = true: sliding-window attention is not supported")
    kinds = set(cfg.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise _refuse(folder, f"layer_types {sorted(kinds)}: only full attention layers are supported")
    if cfg.get("mlp_bias"):
        raise _refuse(folder, "mlp_bias = true: biases in the MLP are not supported")
    act = cfg.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise _refuse(folder, f"hidden_act `{act}` is not supported (silu or gelu)")
    # Qwen2 always biases q/k/v; Llama's and Qwen3's attention_bias also biases o_proj, which
    # read_weights accepts only when it is zero
    attention_bias = family == "qwen2" or bool(cfg.get("attention_bias", False))
    theta, scaling = _rope(cfg, folder)
    try:
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        n_layers, d_ff, vocab = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except KeyError as exc:
        raise _refuse(folder, f"missing field {exc}") from None
    head_dim = int(cfg.get("head_dim") or d // heads)
    max_pos = int(cfg.get("max_position_embeddings", DEFAULT_IMPORT_CONTEXT))
    files = find_weight_files(folder)
    names = set(_tensor_names(files))
    tied = "lm_head.weight" not in names or bool(cfg.get("tie_word_embeddings", False))
    ctx = context_length or min(max_pos, DEFAULT_IMPORT_CONTEXT)
    try:
        model = ModelConfig(
            arch="llama", vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=None if head_dim * heads == d else head_dim, d_ff=d_ff, context_length=ctx,
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            ffn=_ACTIVATIONS[act], tie_embeddings=tied, qk_norm=family == "qwen3", attention_bias=attention_bias,
            init_std=float(cfg.get("initializer_range", 0.02)))
    except ValueError as exc:  # pydantic: e.g. an odd head_dim
        raise _refuse(folder, f"the shape does not fit a tfkit model: {exc}") from None
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return HFModel(folder=folder, family=family, model=model, max_positions=max_pos, dtype=dtype,
                   weight_files=files, tied=tied, config=cfg)


def _tensor_names(files: list[Path]) -> Iterator[str]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            yield from fh.keys()


def rope_permutation(head_dim: int) -> Tensor:
    """Index that reorders one head's rows from Hugging Face's half layout to tfkit's interleaved
    one: ``tfkit[r] = hf[perm[r]]`` with ``perm[2k] = k``, ``perm[2k+1] = k + D/2``. (D,) int64."""
    r = torch.arange(head_dim)
    return r // 2 + (r % 2) * (head_dim // 2)


def _permute_heads(t: Tensor, head_dim: int, perm: Tensor) -> Tensor:
    """Reorder the rows of each head of a (H*D, ...) projection (or its (H*D,) bias, or a (D,) norm gain)."""
    heads = t.shape[0] // head_dim
    return t.reshape(heads, head_dim, *t.shape[1:])[:, perm].reshape(t.shape).contiguous()


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight", "self_attn.q_proj.bias": "attn.wq.bias",
    "self_attn.k_proj.weight": "attn.wk.weight", "self_attn.k_proj.bias": "attn.wk.bias",
    "self_attn.v_proj.weight": "attn.wv.weight", "self_attn.v_proj.bias": "attn.wv.bias",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight", "mlp.up_proj.weight": "ffn.w3.weight", "mlp.down_proj.weight": "ffn.w2.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight"}
_ROTATED = ("attn.wq.", "attn.wk.", "attn.q_norm.", "attn.k_norm.")


def tfkit_name(hf_name: str) -> Optional[str]:
    """tfkit's name of a Hugging Face tensor, or None when it has no place (e.g. ``rotary_emb.inv_freq``)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blocks.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def hf_name(name: str) -> str:
    """The Hugging Face name of a tfkit llama tensor (inverse of :func:`tfkit_name`).

    Raises:
        KeyError: the name has no Hugging Face counterpart.
    """
    for k, v in _TOP_NAMES.items():
        if v == name:
            return k
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m:
        for k, v in _LAYER_NAMES.items():
            if v == m.group(2):
                return f"model.layers.{m.group(1)}.{k}"
    raise KeyError(name)


def read_weights(hf: HFModel, dtype: Optional[torch.dtype] = None,
                 on_progress: Callable[[int], None] = lambda n: None) -> dict[str, Tensor]:
    """The model's tensors under tfkit's names, q/k rows in tfkit's RoPE order, one tensor read at a
    time (peak memory: the result plus one tensor). Kept in the stored dtype unless ``dtype``.

    Raises:
        CheckpointError: a weight file is unreadable, a tensor is missing, has no place in the
            model or has the wrong shape; an o_proj bias that is not zero.
    """
    from safetensors import SafetensorError, safe_open

    from tfkit.models import build_model

    cfg = hf.model
    hd = cfg.head_size
    perm = rope_permutation(hd)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    out: dict[str, Tensor] = {}
    for f in hf.weight_files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    t = fh.get_tensor(name)
                    on_progress(t.numel() * t.element_size())
                    if name.endswith("o_proj.bias"):
                        if torch.count_nonzero(t):
                            raise _refuse(hf.folder, f"`{name}` is not zero: an output-projection bias is not supported")
                        continue
                    own = tfkit_name(name)
                    if own is None:
                        if "rotary_emb" in name:
                            continue
                        raise CheckpointError(f"`{f}`: tensor `{name}` has no place in a tfkit {hf.family} model",
                                              "this checkpoint does not match its config.json")
                    if own == "head.weight" and hf.tied:
                        continue
                    if own.split(".", 2)[-1].startswith(_ROTATED):  # blocks.i.attn.wq.weight...
                        t = _permute_heads(t, hd, perm)
                    out[own] = t if dtype is None else t.to(dtype)
        except SafetensorError as exc:
            raise CheckpointError(f"`{f}`: cannot read weights ({exc})", "re-download the model") from None
    missing = sorted(set(want) - set(out))
    if missing:
        raise CheckpointError(f"`{hf.folder}`: the weights lack {', '.join(hf_name(m) for m in missing[:3])}"
                              + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""),
                              "the weights do not match config.json; re-download the model")
    bad = [f"{hf_name(k)} {tuple(v.shape)} != {want[k]}" for k, v in out.items() if tuple(v.shape) != want[k]]
    if bad:
        raise CheckpointError(f"`{hf.folder}`: tensor shapes do not match config.json: {'; '.join(bad[:3])}",
                              "the weights do not match config.json; re-download the model")
    return out


# ---------------------------------------------------------------------------------------------
# Export


def export_family(cfg: ModelConfig) -> str:
    """The Hugging Face family that holds a tfkit model exactly: ``qwen3`` with QK-norm, ``qwen2``
    with q/k/v biases, ``llama`` otherwise.

    Raises:
        ConfigError: the arch has no Hugging Face equivalent (mod, dtf, free, mhc).
    """
    if cfg.arch != "llama":
        why = {"mod": "Mixture-of-Depths routing", "dtf": "the Dynamic Transformer's surprise gates",
               "free": "the Free Transformer's latent encoder", "mhc": "hyper-connection stream mixing"}[cfg.arch]
        raise ConfigError(f"a model.arch={cfg.arch} run cannot be exported: no transformers model class has {why}, "
                          "so AutoModelForCausalLM could not load it without custom code",
                          "export a llama run; the research variants stay in tfkit (`tfkit eval`, `tfkit generate`)")
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.attention_bias else "llama"


def hf_config(cfg: ModelConfig, dtype: str, bos_id: int, eos_ids: list[int]) -> dict[str, Any]:
    """``config.json`` of the Hugging Face model equal to a tfkit llama ``cfg`` (keys both
    transformers 4 and 5 read: ``rope_theta`` and ``rope_scaling``)."""
    family = export_family(cfg)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "hidden_act": "silu" if cfg.ffn == "swiglu" else "gelu", "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "attention_dropout": 0.0,
        "bos_token_id": bos_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "torch_dtype": dtype, "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_context_length}
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if family == "qwen3":
            out["attention_bias"] = cfg.attention_bias
    return out


def hf_weights(tensors: dict[str, Tensor], cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """tfkit llama tensors -> Hugging Face names, q/k rows back in the half layout; with
    ``attention_bias`` under Qwen3 (whose o_proj then has a bias) a zero ``o_proj.bias`` is added."""
    inv = torch.argsort(rope_permutation(cfg.head_size))
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name.split(".", 2)[-1].startswith(_ROTATED):
            t = _permute_heads(t, cfg.head_size, inv)
        out[hf_name(name)] = (t if dtype is None else t.to(dtype)).contiguous()
    if cfg.attention_bias and export_family(cfg) == "qwen3":
        for i in range(cfg.n_layers):
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.d_model, dtype=out["model.norm.weight"].dtype)
    return out


def save_sharded(tensors: dict[str, Tensor], out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write ``model.safetensors``, or ``model-0000x-of-0000y.safetensors`` shards of at most
    ``max_shard_bytes`` each with ``model.safetensors.index.json`` when the tensors are larger.

    Returns:
        the files written.
    """
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return [out / "model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        files.append(out / fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files


def tokenizer_config(eos: str, bos: Optional[str], context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for a tokenizer trained by tfkit: its end-of-text token, the chat
    template of its role tokens (:data:`CHAT_TEMPLATE`) and the context length."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos, "pad_token": eos,
            "unk_token": None, "model_max_length": context_length, "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``, ``"fp32"``/``"float32"`` -> the torch dtype.

    Raises:
        ConfigError: another name.
    """
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}
    key = aliases.get(name.lower(), name.lower())
    if key not in _DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of bf16, fp16, fp32", "write e.g. `--dtype bf16`")
    return _DTYPES[key]


def size_text(n_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(len(units) - 1, int(math.log(max(n_bytes, 1), 1024)))
    return f"{n_bytes / 1024**i:.1f} {units[i]}"
