"""Hugging Face folders as tfkit runs: :func:`import_run` makes a run (config, tokenizer, a step-0
checkpoint) of a model folder; :func:`export_run` writes a run's weights as a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads without custom code."""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tfkit.config import load
from tfkit.data.tokenizer import Tokenizer
from tfkit.errors import CheckpointError, ConfigError, DataError
from tfkit.interop import hf
from tfkit.paths import runs_dir
from tfkit.train import checkpoint as ckpt_mod
from tfkit.train import runs


@dataclass
class Imported:
    """What :func:`import_run` made: the run folder, the model read, its parameter count and the
    bytes of weights written."""

    run_dir: Path
    model: hf.HFModel
    params: int
    weight_bytes: int


def run_name_for(source: str) -> str:
    """A run name for a source: the last part of a path or repo id (``Qwen/Qwen2.5-0.5B`` ->
    ``Qwen2.5-0.5B``), other characters replaced by ``-``."""
    last = source.rstrip("/").rsplit("/", 1)[-1] or "imported"
    return re.sub(r"[^A-Za-z0-9._-]", "-", last).lstrip(".-_")[:100] or "imported"


def import_run(source: str, name: Optional[str] = None, context_length: Optional[int] = None,
               download: bool = False, on_status: Callable[[str], None] = lambda s: None,
               on_progress: Callable[[int], None] = lambda n: None) -> Imported:
    """Make the run ``name`` from a Hugging Face model folder or a cached repo id.

    The run holds ``config.yaml`` (``model`` = the imported network, ``data.tokenizer`` = the run's
    own copy of the model's tokenizer), ``tokenizer.json`` with its ``tokenizer_config.json`` and
    ``generation_config.json``, and ``checkpoints/step-00000000`` (weights in their stored dtype).
    It is written under a temporary name and renamed into place when complete.

    Raises:
        UnsupportedModel: the model cannot be represented exactly (:func:`hf.read_model`).
        DataError: no tokenizer.json, unreadable files, a tokenizer larger than the model's vocabulary.
        CheckpointError: the run exists, or the weights do not match the config.
        ConfigError: the name is not allowed.
    """
    from tfkit.train.setup import check_new_run_name, new_run

    name = name or run_name_for(source)
    check_new_run_name(name)  # before the minutes a large model takes to read
    folder = hf.find_source(source, download=download, on_status=on_status)
    model = hf.read_model(folder, context_length)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise DataError(f"`{folder}` has no tokenizer.json", "tfkit reads the model's fast tokenizer file "
                        "(`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` writes one)")
    tok = Tokenizer.load(tok_path)
    if tok.vocab_size > model.model.vocab_size:
        raise DataError(f"`{tok_path}` has {tok.vocab_size} tokens but the model's vocab_size is {model.model.vocab_size}",
                        "the tokenizer does not belong to this model")
    on_status(f"reading {len(model.weight_files)} weight file(s) of a {model.family} model ({model.dtype})")
    tensors = hf.read_weights(model, on_progress=on_progress)
    base = load()
    cfg = base.model_copy(update={"model": model.model, "data": base.data.model_copy(update={"tokenizer": str(tok_path)})})
    run_dir = new_run(cfg, name)
    try:
        final_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": str(run_dir / "tokenizer.json")})})
        runs.write_run_config(run_dir, final_cfg, name)
        ckpt = ckpt_mod.save_weights(run_dir, tensors, 0, {"imported_from": source, "family": model.family})
        params = sum(t.numel() for t in tensors.values())
        runs.update_run_info(run_dir, status="imported", params=params, imported_from=source,
                             hf_family=model.family, hf_folder=str(folder))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # never leave half a run
        raise
    return Imported(run_dir, model, params, (ckpt / "model.safetensors").stat().st_size)


@dataclass
class Exported:
    """What :func:`export_run` wrote."""

    out: Path
    family: str
    checkpoint: Path
    step: int
    dtype: str
    files: list[Path]


def export_run(run: str, out: Path, which: str = "latest", dtype: Optional[str] = None,
               max_shard_bytes: int = hf.MAX_SHARD_BYTES, force: bool = False,
               on_warning: Callable[[str], None] = lambda s: None) -> Exported:
    """Write run ``run``'s weights (checkpoint ``which``) as a Hugging Face folder ``out``.

    Files: ``config.json`` (Llama, Qwen2 with q/k/v biases, Qwen3 with QK-norm), ``model.safetensors``
    (or shards with an index above ``max_shard_bytes``), ``tokenizer.json``, ``tokenizer_config.json``
    (the imported model's own, or one with the end-of-text token and tfkit's chat template) and
    ``generation_config.json``. The folder is written beside ``out`` under a temporary name and
    renamed into place when complete.

    Args:
        dtype: ``bf16``, ``fp16`` or ``fp32``; default: the dtype the checkpoint stores.

    Raises:
        ConfigError: an arch without a Hugging Face equivalent, a bad dtype, or ``out`` exists
            (without ``force``).
        CheckpointError: unknown run or checkpoint.
        DataError: the run has no tokenizer.
    """
    from safetensors.torch import load_file

    from tfkit.train.setup import load_run_config

    run_dir = runs.resolve_run(run)
    cfg = load_run_config(run_dir)
    family = hf.export_family(cfg.model)
    want = hf.parse_dtype(dtype) if dtype else None
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise DataError(f"run `{run_dir.name}` has no tokenizer.json, and a Hugging Face model needs one",
                        "train with `--tokenizer tokenizer.json` to export")
    tok = Tokenizer.load(tok_path)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            raise ConfigError(f"`{out}` exists already", "choose another `--out`, or pass `--force` to replace it")
    ckpt = ckpt_mod.find_checkpoint(run_dir, which, on_warning=on_warning)
    step = int(ckpt_mod.load_state(ckpt).get("step", 0))
    try:
        tensors = load_file(str(ckpt / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        raise CheckpointError(f"`{ckpt / 'model.safetensors'}`: cannot read weights ({exc})",
                              "use another checkpoint with `--checkpoint STEP`") from None
    target = want or next(iter(tensors.values())).dtype
    weights = hf.hf_weights(tensors, cfg.model, target)
    del tensors
    eos_ids = list(tok.stop_ids)
    config = hf.hf_config(cfg.model, hf.dtype_name(target), tok.bos_id, eos_ids)

    out = out.expanduser().resolve()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = hf.save_sharded(weights, tmp, max_shard_bytes)
        _write_json(tmp / "config.json", config)
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        if (run_dir / "tokenizer_config.json").is_file():  # an imported model's own (its chat template)
            shutil.copyfile(run_dir / "tokenizer_config.json", tmp / "tokenizer_config.json")
        else:
            bos = tok.id_to_token(tok.bos_id)
            _write_json(tmp / "tokenizer_config.json",
                        hf.tokenizer_config(tok.id_to_token(tok.eot_id), bos, cfg.model.context_length))
        gen: dict[str, Any] = {"bos_token_id": tok.bos_id, "eos_token_id": config["eos_token_id"],
                               "pad_token_id": tok.eot_id}
        if (run_dir / "generation_config.json").is_file():
            gen = {**json.loads((run_dir / "generation_config.json").read_text()), **{k: v for k, v in gen.items()
                                                                                       if k == "pad_token_id"}}
        _write_json(tmp / "generation_config.json", gen)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    runs.append_history(run_dir, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": "export",
                                  "command": runs.command_line(), "out": str(out), "checkpoint": ckpt.name})
    return Exported(out, family, ckpt, step, hf.dtype_name(target), [out / f.name for f in files])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def init_source(init_from: str, allow_import: bool = True, on_status: Callable[[str], None] = lambda s: None) -> Path:
    """The run folder that ``--init-from`` names: a tfkit run, else a Hugging Face folder or cached
    repo id, imported once as a run named after it (:func:`run_name_for`) and reused next time.

    Raises:
        CheckpointError: neither a run nor a Hugging Face model; or one that needs importing while
            ``allow_import`` is False (under torchrun: import it first).
        and whatever :func:`import_run` raises.
    """
    try:
        return runs.resolve_run(init_from)
    except CheckpointError as not_a_run:
        path = Path(init_from).expanduser()
        looks_hf = (path / "config.json").is_file() or (not path.exists() and "/" in init_from
                                                      and not init_from.startswith((".", "/", "~")))
        if not looks_hf:
            raise not_a_run
    name = run_name_for(init_from)
    existing = runs_dir() / name
    if existing.is_dir():
        info = runs.read_run_info(existing)
        if info.get("imported_from") == init_from:
            on_status(f"init: `{init_from}` was imported before as run `{name}`")
            return existing
        raise CheckpointError(f"run `{name}` exists and was not imported from `{init_from}`",
                              f"import it under another name with `tfkit import {init_from} --name NAME`, "
                              "then `--init-from NAME`")
    if not allow_import:
        raise CheckpointError(f"`{init_from}` is not a tfkit run yet",
                              f"import it once before a distributed run: `tfkit import {init_from}`")
    imported = import_run(init_from, name, on_status=on_status)
    on_status(f"init: imported `{init_from}` as run `{name}` ({imported.params:,} parameters)")
    return imported.run_dir


def source_model_sets(run_dir: Path) -> list[str]:
    """``model.KEY=VALUE`` overrides that reproduce a run's model section (for ``--init-from``:
    the new run takes the source's shape unless a file or ``--set`` says otherwise)."""
    from tfkit.train.resume import flatten
    from tfkit.train.setup import load_run_config

    model = load_run_config(run_dir).model
    data = model.model_dump(mode="json", exclude_none=True)
    for name in ("mod", "dtf", "free", "mhc"):
        data.pop(name, None)  # the variant sections follow the new run's arch
    out = []
    for key, value in flatten(data, "model").items():
        out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out
