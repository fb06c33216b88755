"""Turning a config into a run folder, and a run folder back into a model.

:func:`new_run` resolves the data (the bundled corpus when none is given), checks that tokenizer,
token files and ``model.vocab_size`` agree, and writes the self-contained run folder.
:func:`load_run` rebuilds the model of a finished or interrupted run from its checkpoint.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from tfkit import __version__
from tfkit.config import RunConfig, count_params, load, padded_vocab
from tfkit.data.tokenfile import TokenFile
from tfkit.data.tokenizer import Tokenizer, copy_tokenizer
from tfkit.errors import CheckpointError, ConfigError, DataError
from tfkit.paths import runs_dir
from tfkit.train import checkpoint as ckpt_mod
from tfkit.train import runs

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def resolve_data(cfg: RunConfig, on_status: Callable[[str], None] = lambda s: None,
                 on_progress: Optional[Callable[[int], None]] = None) -> RunConfig:
    """Fill ``data.train``/``val``/``tokenizer`` (the bundled corpus when ``data.train`` is empty),
    make the paths absolute, and set ``model.vocab_size`` from the tokenizer when unset.

    Raises:
        DataError: a file is missing or malformed, or tokenizer and token files disagree.
        ConfigError: ``model.vocab_size`` is smaller than the data's vocabulary.
    """
    data = cfg.data.model_copy()
    if data.train is None:
        if data.val is not None:
            raise ConfigError("`data.val` is set but `data.train` is not", "give `--train-data FILE` too")
        from tfkit.data.default_corpus import ensure_default_data

        dd = ensure_default_data(vocab_size=data.default_vocab_size, on_status=on_status, on_progress=on_progress)
        data.train, data.val = str(dd.train), str(dd.val)
        data.tokenizer = data.tokenizer or str(dd.tokenizer)
    for key in ("train", "val", "tokenizer"):
        value = getattr(data, key)
        if value:
            setattr(data, key, str(Path(value).expanduser().resolve()))
    header = TokenFile.open(data.train).header
    vocab = header.vocab_size
    if data.val:
        val_header = TokenFile.open(data.val).header
        if val_header.tokenizer_hash != header.tokenizer_hash:
            raise DataError(f"`{data.val}` and `{data.train}` were made by different tokenizers",
                            "prepare both with the same tokenizer.json (`tfkit prepare … --tokenizer F`)")
        vocab = max(vocab, val_header.vocab_size)
    if data.tokenizer:
        tok = Tokenizer.load(data.tokenizer)
        if header.tokenizer_hash not in ("none", "") and header.tokenizer_hash != tok.hash:
            raise DataError(f"`{data.train}` was not made by the tokenizer `{data.tokenizer}` (hash mismatch)",
                            "re-run `tfkit prepare` with this tokenizer, or pass the tokenizer that made the data")
        if tok.vocab_size < header.vocab_size:
            raise DataError(f"tokenizer `{data.tokenizer}` has {tok.vocab_size} tokens but `{data.train}` "
                            f"declares vocab_size {header.vocab_size}", "prepare the data with this tokenizer")
        vocab = tok.vocab_size
    model = cfg.model.model_copy()
    if model.vocab_size is None:
        model.vocab_size = padded_vocab(vocab)
    elif model.vocab_size < vocab:
        raise ConfigError(f"`model.vocab_size` = {model.vocab_size} is below the data's vocabulary of {vocab}",
                          f"remove the setting to follow the tokenizer, or set it to at least {vocab}")
    return cfg.model_copy(update={"data": data, "model": model})


def default_run_name(cfg: RunConfig, preset: Optional[str]) -> str:
    """``<arch>-<preset>-<YYYYmmdd-HHMMSS>``, made unique in ``runs_dir()``."""
    base = f"{cfg.model.arch}-{preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, i = base, 1
    while (runs_dir() / name).exists():
        i += 1
        name = f"{base}-{i}"
    return name


def check_new_run_name(name: str) -> Path:
    """The folder a new run ``name`` will have, after checking the name is allowed and free.

    Raises:
        ConfigError: the name has characters other than letters, digits, ``.``, ``_``, ``-``.
        CheckpointError: a run of that name exists already.
    """
    if not _NAME.match(name):
        raise ConfigError(f"run name {name!r} is not allowed",
                          "use letters, digits, '.', '_' and '-' (at most 100 characters)")
    run_dir = runs_dir() / name
    if run_dir.exists():
        raise CheckpointError(f"run `{name}` already exists in `{runs_dir()}`",
                              f"continue it with `tfkit resume {name}`, or choose another `--name`")
    return run_dir


def new_run(cfg: RunConfig, name: str, preset: Optional[str] = None) -> Path:
    """Create ``runs/<name>/`` with the resolved ``config.yaml``, ``tokenizer.json`` and ``run.json``.

    Raises:
        ConfigError: the name has characters other than letters, digits, ``.``, ``_``, ``-``.
        CheckpointError: a run of that name exists already.
    """
    run_dir = check_new_run_name(name)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if cfg.data.tokenizer:
        copy_tokenizer(cfg.data.tokenizer, tmp)
    runs.write_run_config(tmp, cfg, name)
    runs.write_json_atomic(tmp / "run.json", {
        "name": name, "arch": cfg.model.arch, "params": count_params(cfg.model), "preset": preset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "created", "step": 0,
        "best_val_loss": None, "tfkit_version": __version__,
        "history": [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": "train", "command": runs.command_line()}]})
    tmp.rename(run_dir)
    return run_dir


def load_run_config(run_dir: Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """The config saved in a run folder, with optional ``key=value`` overrides.

    Raises:
        CheckpointError: ``config.yaml`` is missing.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"run `{run_dir}` has no config.yaml", "the run folder is incomplete")
    return load(path, overrides=overrides)


def run_runtime(name_or_path: str):
    """The :class:`~tfkit.hardware.Runtime` a run's saved ``system`` settings resolve to on this
    machine: what ``eval`` and ``generate`` load the model onto, with its attention kernel and
    precision (TF32 switched on for fp32 on CUDA).

    Raises:
        CheckpointError: unknown run, or no config.yaml.
        HardwareError: the saved settings cannot work here (e.g. ``system.device=cuda`` without a GPU).
    """
    from tfkit import hardware

    runtime = hardware.resolve(load_run_config(runs.resolve_run(name_or_path)).system, hardware.detect())
    runtime.configure()
    return runtime


@dataclass
class LoadedRun:
    """A model restored from a run, ready for ``eval`` or ``generate``."""

    run_dir: Path
    checkpoint: Path
    step: int
    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: Optional[Tokenizer]


def load_run(name_or_path: str, device: str = "cpu", which: str = "latest", attention: str = "sdpa",
             on_warning: Callable[[str], None] = lambda s: None) -> LoadedRun:
    """Rebuild a run's model from its checkpoint (``latest``, ``best`` or a step) in eval mode.

    Raises:
        CheckpointError: unknown run, no complete checkpoint, weights that do not fit the config,
            or weights holding NaN/Inf.
    """
    from tfkit.models import build_model

    run_dir = runs.resolve_run(name_or_path)
    cfg = load_run_config(run_dir)
    ckpt = ckpt_mod.find_checkpoint(run_dir, which, on_warning=on_warning)
    model = build_model(cfg.model, attention=attention, device="meta").materialize("cpu")  # no random init
    ckpt_mod.load_weights(model, ckpt, "cpu")
    bad = ckpt_mod.first_non_finite(model)
    if bad is not None:
        raise CheckpointError(f"`{ckpt / 'model.safetensors'}`: weight `{bad}` holds NaN or Inf (the run diverged)",
                              "load an earlier checkpoint with `--checkpoint STEP` (`ls` its checkpoints folder)")
    model.to(device).eval()
    tok_path = run_dir / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path) if tok_path.is_file() else None
    step = int(ckpt_mod.load_state(ckpt).get("step", 0))
    return LoadedRun(run_dir=run_dir, checkpoint=ckpt, step=step, cfg=cfg, model=model, tokenizer=tokenizer)
