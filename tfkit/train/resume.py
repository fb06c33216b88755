"""Deciding how a run continues: which checkpoint, what changed since it was written, what the
user changed on purpose, and whether anything is left to train.

A checkpoint records the resolved config and the fingerprints of the data it was trained on
(:func:`tfkit.train.runs.data_fingerprints`). :func:`plan_resume` compares them with the run as it
is on disk now: a changed config field (other than the budget, ``train.max_steps`` and
``train.max_time``), changed token files or a changed tokenizer are refused unless the user
passes ``--allow-changes``; deliberate changes are made with ``--set key=value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tfkit import __version__
from tfkit.config import RunConfig, load, parse_duration, parse_override
from tfkit.errors import CheckpointError, ConfigError, DataError
from tfkit.train import checkpoint as ckpt_mod
from tfkit.train import runs

BUDGET_FIELDS = ("train.max_steps", "train.max_time")
"""Config fields a resume may change without notice: how long to train."""


@dataclass
class ResumePlan:
    """What ``tfkit resume`` will do.

    Attributes:
        cfg: the config to train with (``--set`` changes and the new budget applied).
        checkpoint: the verified checkpoint to start from; ``None`` when the run has none yet (it was
            stopped before its first save) and starts from step 0.
        step: the checkpoint's step (0 without one).
        changes: ``--set`` changes, dotted field -> (checkpoint's value, new value).
        allowed: changes found on disk and accepted with ``--allow-changes``, field or file -> (was, now).
        reset_loader: the training data changed: start its data order afresh.
        notes: lines for the user (recovered folders, version differences...).
        time_budget_s: wall-clock seconds for this session (``--max-time``), or ``None``.
        refit_schedule: fit the learning-rate schedule to the new step or time budget.
        fingerprints: the data fingerprints measured now (:func:`tfkit.train.runs.data_fingerprints`).
        config_changed: ``cfg`` differs from the run's ``config.yaml`` (it is written when training starts).
    """

    cfg: RunConfig
    checkpoint: Optional[Path]
    step: int
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    allowed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    reset_loader: bool = False
    notes: list[str] = field(default_factory=list)
    time_budget_s: Optional[float] = None
    refit_schedule: bool = False
    fingerprints: Optional[dict[str, Any]] = None
    config_changed: bool = False


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists and scalars are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def with_new_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A config dump recorded by an earlier tfkit, with the fields added since at their defaults
    (e.g. ``data.loss_on``, ``model.attention_bias``), so that a field a checkpoint never knew is not
    taken for a change; the dump as it is when it no longer validates."""
    try:
        return RunConfig.model_validate(recorded).model_dump(mode="json")
    except ValueError:
        return recorded


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted fields whose values differ between two config dumps (``model_dump(mode="json")``)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _shown(value: Any) -> str:
    return "(unset)" if value is None else repr(value) if isinstance(value, str) else str(value)


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """``optim.lr 0.001 -> 0.0003, train.batch_size 16 -> 8``."""
    return ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())


def weight_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model of ``cfg`` saves (built on the meta device: no memory)."""
    import torch

    from tfkit.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _data_changes(recorded: dict[str, Any], now: dict[str, Any], deliberate: set[str]) -> dict[str, tuple[Any, Any]]:
    """What changed in the data since the checkpoint: ``data.train``/``data.val`` token files and the
    run's tokenizer, skipping files whose path the user changed on purpose (``--set data.train=...``)."""
    found: dict[str, tuple[Any, Any]] = {}
    for key in ("train", "val"):
        was, cur = recorded.get(key), now.get(key)
        if f"data.{key}" in deliberate or not was:
            continue
        if not cur:
            found[f"data.{key}"] = (was.get("path"), None)
        elif was.get("tokenizer_hash") != cur.get("tokenizer_hash"):
            found[f"`{cur['path']}` (re-made with another tokenizer)"] = (was.get("tokenizer_hash", "")[:12],
                                                                          cur.get("tokenizer_hash", "")[:12])
        elif was.get("fingerprint") != cur.get("fingerprint"):
            found[f"`{cur['path']}` (content)"] = (f"{was.get('n_tokens')} tokens", f"{cur.get('n_tokens')} tokens")
    was, cur = recorded.get("tokenizer"), now.get("tokenizer")
    if was and was.get("hash") != (cur or {}).get("hash"):
        found["the run's tokenizer.json"] = (was.get("hash", "")[:12], (cur or {}).get("hash", "")[:12] or None)
    return found


def plan_resume(run_dir: Path, checkpoint: str = "latest", overrides: Optional[list[str]] = None,
                max_steps: Optional[int] = None, max_time: Optional[str] = None, allow_changes: bool = False,
                on_warning: Callable[[str], None] = lambda s: None) -> ResumePlan:
    """Check a run against its checkpoint and decide how it continues (call with the run lock held:
    it finishes interrupted checkpoint writes first).

    Args:
        checkpoint: ``latest``, ``best`` (the full checkpoint at the best evaluation's step) or a step.
        overrides: ``--set key=value`` changes to make on purpose (printed and kept in the run's
            history); not the budget, and not model fields that change the weights' shapes.
        max_steps: new total of optimizer steps (stretches the schedule).
        max_time: more wall-clock time for this session (``90s``, ``5m``...); refits the schedule.
        allow_changes: accept config, data and tokenizer changes found on disk.

    Raises:
        ConfigError: the config, data or tokenizer changed since the checkpoint (without
            ``--allow-changes``), naming each change; a bad ``--set``; a budget not beyond the
            checkpoint; the run already finished.
        CheckpointError: no usable checkpoint, or ``best`` has no full checkpoint to resume.
        DataError: a token file is missing or malformed.
    """
    from tfkit.train.setup import load_run_config

    plan_notes = [f"recovered: {n}" for n in ckpt_mod.recover_checkpoints(run_dir)]
    overrides = list(overrides or [])
    set_keys = []
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key in BUDGET_FIELDS:
            flag = "--max-steps N" if key.endswith("max_steps") else "--max-time 5m"
            raise ConfigError(f"--set {text}: the budget is not changed with --set", f"use `{flag}`")
        set_keys.append(key)
    try:
        budget = parse_duration(max_time)
    except ValueError as exc:
        raise ConfigError(f"--max-time: {exc}", "write e.g. `--max-time 5m`") from None

    cfg_disk = load_run_config(run_dir)
    ckpt, state = _pick_checkpoint(run_dir, checkpoint, on_warning)
    step = int(state.get("step", 0)) if ckpt else 0
    if ckpt is None:
        plan_notes.append("no checkpoint yet (stopped before the first save): training starts from step 0")

    budget_sets = [f"train.max_steps={max_steps}"] if max_steps else []
    if max_steps and not max_time:
        budget_sets.append("train.max_time=")  # a step target replaces the run's original time budget
    cfg = load(run_dir / "config.yaml", overrides=overrides + budget_sets)
    moved = {k: str(Path(getattr(cfg.data, k)).expanduser().resolve()) for k in ("train", "val")
             if f"data.{k}" in set_keys and getattr(cfg.data, k)}
    if moved:  # a path given with --set is relative to where the command runs, not to the run
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=moved)})

    recorded_cfg = state.get("config") if isinstance(state.get("config"), dict) else None
    base = with_new_defaults(recorded_cfg) if recorded_cfg is not None else cfg_disk.model_dump(mode="json")
    diff = {k: v for k, v in config_diff(base, cfg.model_dump(mode="json")).items() if k not in BUDGET_FIELDS}
    changes = {k: v for k, v in diff.items() if k in set_keys}
    unannounced = {k: v for k, v in diff.items() if k not in set_keys}
    if ckpt is None:
        unannounced = {}  # nothing trained yet: the config on disk is simply the run's config
    elif recorded_cfg is None:
        plan_notes.append(f"`{ckpt.name}` predates change detection (no recorded config): changes are not checked")

    if any(k.startswith("model.") for k in diff) and weight_shapes(cfg) != weight_shapes(RunConfig.model_validate(base)):
        keys = [k for k in diff if k.startswith("model.")]
        raise ConfigError(f"{', '.join(keys)} would change the shapes of the weights in `{ckpt.name if ckpt else 'the run'}`",
                          f"start a new run from these weights instead: `tfkit train ... --init-from {run_dir.name}`")

    recorded_data = state.get("data") if isinstance(state.get("data"), dict) else None
    data_changes: dict[str, tuple[Any, Any]] = {}
    reset_loader = "data.train" in changes
    now = runs.data_fingerprints(cfg, run_dir)
    _check_tokenizer(run_dir, now, set(set_keys))
    if ckpt is not None and recorded_data is not None:
        data_changes = _data_changes(recorded_data, now, set(set_keys))
        was_train = recorded_data.get("train") or {}
        reset_loader = was_train.get("fingerprint") != (now.get("train") or {}).get("fingerprint")
    if (unannounced or data_changes) and not allow_changes:
        what = describe({**unannounced, **data_changes})
        raise ConfigError(f"run `{run_dir.name}` changed since checkpoint step {step}: {what}",
                          "undo the change; or make a config change on purpose with "
                          f"`tfkit resume {run_dir.name} --set KEY=VALUE`; or accept it with `--allow-changes`")

    written_by = state.get("tfkit_version")
    if ckpt is not None and written_by and written_by != __version__:
        plan_notes.append(f"`{ckpt.name}` was written by tfkit {written_by}, this is {__version__}: "
                          "the run continues, but bit-exactness across versions is not promised")

    if ckpt is not None:
        _check_budget(run_dir, cfg, state, step, max_steps, budget)
    return ResumePlan(cfg=cfg, checkpoint=ckpt, step=step, changes=changes, allowed={**unannounced, **data_changes},
                      reset_loader=bool(reset_loader), notes=plan_notes, time_budget_s=budget,
                      refit_schedule=bool(max_steps or budget), fingerprints=now, config_changed=cfg != cfg_disk)


def _check_tokenizer(run_dir: Path, now: dict[str, Any], deliberate: set[str]) -> None:
    """A token file given with ``--set data.train=...`` must come from the run's tokenizer.

    Raises:
        DataError: naming the file, with the command that prepares it with the right tokenizer.
    """
    run_hash = (now.get("tokenizer") or {}).get("hash")
    for key in ("train", "val"):
        fp = now.get(key)
        if f"data.{key}" in deliberate and fp and run_hash and fp["tokenizer_hash"] not in ("none", "", run_hash):
            raise DataError(f"`{fp['path']}` (--set data.{key}) was made by another tokenizer than run `{run_dir.name}`'s",
                            f"prepare it with `tfkit prepare ... --tokenizer {run_dir / 'tokenizer.json'}`")


def _pick_checkpoint(run_dir: Path, which: str, on_warning: Callable[[str], None]) -> tuple[Optional[Path], dict]:
    """The checkpoint to resume and its ``state.json``; ``(None, {})`` for ``latest`` of a run that
    has no checkpoint folder at all."""
    if which == "latest" and not ckpt_mod.list_checkpoints(run_dir):
        return None, {}
    if which == "best":
        best = ckpt_mod.find_checkpoint(run_dir, "best")
        step = int(ckpt_mod.load_state(best).get("step", -1))
        if ckpt_mod.read_manifest(best)["kind"] != "full":
            full = [p for s, p in ckpt_mod.list_checkpoints(run_dir) if s == step]
            if not full:
                raise CheckpointError(
                    f"the best evaluation (step {step}) of run `{run_dir.name}` kept its weights only, not the "
                    "optimizer and data state a resume needs",
                    "resume from `--checkpoint latest` or a step; `tfkit eval`/`generate --checkpoint best` use those weights")
            which = str(step)
        else:
            return best, ckpt_mod.load_state(best)
    ckpt = ckpt_mod.find_checkpoint(run_dir, which, on_warning=on_warning)
    state = ckpt_mod.load_state(ckpt)
    if ckpt_mod.read_manifest(ckpt)["kind"] != "full":  # `tfkit import`'s step 0: weights, no training state
        source = state.get("imported_from", "another tool")
        raise CheckpointError(
            f"run `{run_dir.name}` holds a model imported from `{source}` and has not been trained, so there is "
            "no training to resume",
            f"train it on your data with `tfkit train --init-from {run_dir.name} --train-data FILE.bin` "
            f"(prepare FILE.bin with `tfkit prepare TEXT --tokenizer {run_dir / 'tokenizer.json'}`)")
    return ckpt, state


def _check_budget(run_dir: Path, cfg: RunConfig, state: dict, step: int, max_steps: Optional[int],
                  budget: Optional[float]) -> None:
    """Refuse a step budget not beyond the checkpoint, and a finished run without a new budget."""
    if max_steps is not None and max_steps <= step:
        raise ConfigError(f"--max-steps {max_steps} is not beyond the checkpoint's step {step}",
                          f"give a larger number, e.g. `--max-steps {step * 2}`")
    if max_steps is None and budget is None and is_finished(cfg, state):
        raise ConfigError(f"run `{run_dir.name}` already finished (step {step}, its step or time budget is spent)",
                          f"train further with `tfkit resume {run_dir.name} --max-steps {max(step * 2, 10)}` or `--max-time 5m`")


def is_finished(cfg: RunConfig, state: dict) -> bool:
    """Whether a run whose checkpoint holds ``state`` has nothing left to do under the budget of
    ``cfg``: no evaluation is pending, and its steps are done, or its time budget (``train.max_time``)
    is spent or the schedule fitted to it has run out."""
    if state.get("eval_pending"):
        return False
    step = int(state.get("step", 0))
    if step >= cfg.train.max_steps:
        return True
    max_time = cfg.train.max_time_s
    if max_time is None:
        return False
    fitted = int(state.get("schedule_steps") or cfg.train.max_steps)
    return float(state.get("elapsed_s") or 0.0) >= max_time or step >= fitted
