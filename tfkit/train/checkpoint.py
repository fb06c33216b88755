"""Checkpoints: atomic, verified, never pickled; a crash at any moment leaves a loadable run.

A run's ``checkpoints/`` folder holds ``step-NNNNNNNN/`` folders (full checkpoints) and ``best/``
(the weights of the best evaluation so far). A full checkpoint holds

- ``model.safetensors``: weights (shared/tied tensors stored once, by ``safetensors.torch.save_model``);
- ``optimizer.safetensors``: AdamW moments and step counters, keyed ``state.<parameter name>.<field>``
  (by name, so a checkpoint resumes at any world size; older ones are keyed by position);
- ``rng.safetensors``: torch RNG states (CPU, and each CUDA device) of every rank (rank r>0 under ``rank<r>/``);
- ``state.json``: step, tokens seen, schedule length, data-loader position, optimizer hyper-parameters,
  grad-scaler state, Python/NumPy RNG states, and what produced it (the resolved config, the data
  fingerprints, the tfkit version);
- ``manifest.json``: the commit marker, written last: kind (``full`` or ``weights``), step, a write
  sequence number ``seq`` and the SHA-256 and size of every other file.

``best/`` holds ``model.safetensors``, ``state.json`` and a ``weights`` manifest.

Writing (torchtitan/DCP practice, see shared/docs/reliability.md): files go to ``NAME.tmp/``, are
fsynced, the manifest is written last, then ``NAME/`` is moved aside to ``NAME.old/``, ``NAME.tmp/``
is renamed to ``NAME/`` and ``NAME.old/`` removed; a complete checkpoint is never deleted before its
replacement is in place. :func:`recover_checkpoints` finishes whatever a crash interrupted: a
``.tmp`` whose manifest verifies is promoted, an incomplete one removed, a lone ``.old`` restored.

``latest`` is the checkpoint written last (highest ``seq``), not the highest step: after
``resume --checkpoint K`` the later checkpoints of the abandoned line lose to those of the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from tfkit import __version__
from tfkit.errors import CheckpointError
from tfkit.fsutil import fsync_dir
from tfkit.train import faults
from tfkit.train.runs import read_run_info, write_json_atomic

FORMAT_VERSION = 1
BEST = "best"
"""Folder (under ``checkpoints/``) of the best evaluation's weights."""
KIND_FILES = {"full": ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"),
              "weights": ("model.safetensors", "state.json")}
"""The files each kind of checkpoint must list in its manifest, no more, no fewer."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PENDING = re.compile(r"^(step-\d+|best)\.(tmp|old)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dir_name(step: int) -> str:
    """``step-00000042`` for step 42."""
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifests and verification


def _corrupt(ckpt: Path, what: str) -> CheckpointError:
    return CheckpointError(f"`{ckpt / 'manifest.json'}`: {what}", "the checkpoint is corrupt; use an earlier one "
                           "(`--checkpoint STEP`; `tfkit resume` falls back by itself)")


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``manifest.json``, checked for shape: a known ``kind``, an integer ``step``
    (equal to the folder's), and a ``files`` table listing exactly the files of that kind, each with
    an integer ``bytes`` and a hex ``sha256``. Manifests written before ``kind`` existed are ``full``.

    Raises:
        CheckpointError: missing, unreadable or malformed in any of those ways.
    """
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"`{ckpt}`: manifest.json is missing or unreadable (incomplete checkpoint)",
                              "resume from an earlier checkpoint with `--checkpoint STEP`") from None
    if not isinstance(manifest, dict):
        raise _corrupt(ckpt, "is not a JSON object")
    kind = manifest.get("kind", "full")
    if kind not in KIND_FILES:
        raise _corrupt(ckpt, f"unknown kind {kind!r}")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _corrupt(ckpt, f"step {step!r} is not a non-negative integer")
    m = _STEP_DIR.match(ckpt.name.split(".")[0])
    if m and int(m.group(1)) != step:
        raise _corrupt(ckpt, f"says step {step}, the folder is step {int(m.group(1))}")
    seq = manifest.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise _corrupt(ckpt, f"seq {seq!r} is not an integer")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _corrupt(ckpt, "has no `files` table")
    expected = KIND_FILES[kind]
    missing = [f for f in expected if f not in files]
    if missing:
        raise _corrupt(ckpt, f"does not list {', '.join(missing)} (a partial manifest)")
    extra = sorted(set(files) - set(expected))
    if extra:
        raise _corrupt(ckpt, f"lists unexpected files {extra}")
    for name, meta in files.items():
        size = meta.get("bytes") if isinstance(meta, dict) else None
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _corrupt(ckpt, f"entry `{name}` has no valid `bytes`")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise _corrupt(ckpt, f"entry `{name}` has no valid `sha256`")
    return {**manifest, "kind": kind, "seq": seq}


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check the manifest (:func:`read_manifest`) and every file it lists (size, then SHA-256).

    Returns:
        The manifest.

    Raises:
        CheckpointError: manifest missing or malformed, a file missing, truncated or changed.
    """
    manifest = read_manifest(ckpt)
    for name, meta in manifest["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"`{path}` is missing", "the checkpoint is incomplete; use an earlier one")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"`{path}` is {size} bytes, the manifest says {meta['bytes']} (truncated?)",
                                  "the checkpoint is corrupt; use an earlier one")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"`{path}`: SHA-256 does not match the manifest (corrupt or modified)",
                                  "the checkpoint is corrupt; use an earlier one")
    return manifest


_UNREADABLE = 2**62


def _seq(ckpt: Path) -> int:
    """A checkpoint's write sequence number; a malformed manifest counts as newest, so that
    ``latest`` tries it first and warns when it falls back past it."""
    try:
        return read_manifest(ckpt)["seq"]
    except CheckpointError:
        return _UNREADABLE


# ---------------------------------------------------------------------------------------------
# Listing and recovering


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Full checkpoints (folders with a manifest), oldest first by write order, as ``(step, folder)``.

    A step whose ``step-N/`` is missing while a crash left ``step-N.tmp/`` with a manifest, or
    ``step-N.old/``, is listed with that folder, so read-only commands can still load it before
    :func:`recover_checkpoints` (run by ``train``/``resume``) puts it back in place.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    pending: dict[int, Path] = {}
    for d in root.iterdir():
        if not (d / "manifest.json").is_file():
            continue
        m = _STEP_DIR.match(d.name)
        if m:
            found[int(m.group(1))] = d
            continue
        p = _PENDING.match(d.name)
        if p and p.group(1) != BEST:
            step = int(p.group(1)[5:])
            if p.group(2) == "tmp" or step not in pending:  # a complete .tmp is newer than .old
                pending[step] = d
    for step, d in pending.items():
        found.setdefault(step, d)
    return sorted(((s, d) for s, d in found.items()), key=lambda sd: (_seq(sd[1]), sd[0]))


def _commit(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``final`` without a moment when neither exists
    in a loadable form: ``final`` -> ``final.old``, ``tmp`` -> ``final``, remove ``final.old``."""
    old = final.with_name(final.name + ".old")
    if old.exists():  # left by an earlier crash; ``tmp`` supersedes it
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
        faults.hit("save.swap")
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoints(run_dir: Path) -> list[str]:
    """Finish what a crash interrupted in ``checkpoints/`` (call with the run lock held).

    A ``NAME.tmp/`` whose manifest verifies is promoted to ``NAME/``; an incomplete one is removed;
    ``NAME.old/`` is restored when ``NAME/`` is missing and removed otherwise; ``*.del/`` folders
    (interrupted pruning) are removed.

    Returns:
        One line per thing done, for the user.
    """
    root = checkpoints_dir(run_dir)
    notes: list[str] = []
    if not root.is_dir():
        return notes
    entries = sorted(root.iterdir(), key=lambda d: (not d.name.endswith(".tmp"), d.name))  # .tmp first
    for d in entries:
        if not d.exists():
            continue
        if _STEP_DIR.match(d.name):  # a manifest rewrite (make_latest) killed before its rename
            for stray in d.glob(".*.tmp-*"):
                stray.unlink(missing_ok=True)
            continue
        if d.name.endswith(".del") or re.search(r"\.tmp-\d+$", d.name):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            continue
        p = _PENDING.match(d.name)
        if not p:
            continue
        final = root / p.group(1)
        if p.group(2) == "tmp":
            try:
                verify_checkpoint(d)
            except CheckpointError:
                shutil.rmtree(d, ignore_errors=True)
                notes.append(f"removed half-written checkpoint folder `{d.name}` left by an earlier crash")
                continue
            _commit(d, final)
            notes.append(f"completed checkpoint `{final.name}`: a crash had stopped it just before its rename")
        elif final.exists():
            shutil.rmtree(d, ignore_errors=True)
        else:
            os.replace(d, final)
            notes.append(f"restored checkpoint `{final.name}` from `{d.name}` (a crash interrupted its replacement)")
    return notes


def find_checkpoint(run_dir: Path, which: str = "latest", on_warning: Optional[Callable[[str], None]] = None) -> Path:
    """The checkpoint folder to load, verified.

    Args:
        which: ``latest`` (the newest written that verifies, falling back past corrupt ones with a
            warning), ``best`` (the weights of the best evaluation: ``best/``, or a full checkpoint
            at exactly that step; never another one) or a step number.

    Raises:
        CheckpointError: the run has no complete checkpoint, or the named one is missing/corrupt.
    """
    if which == "best":
        return _find_best(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"run `{run_dir.name}` has no complete checkpoint in `{checkpoints_dir(run_dir)}`",
                              "train it first with `tfkit train`, or `tfkit resume` an interrupted run")
    if which == "latest":
        for step, path in reversed(ckpts):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as exc:
                if on_warning:
                    on_warning(f"skipping checkpoint step {step}: {exc.message}")
        raise CheckpointError(f"every checkpoint of run `{run_dir.name}` failed verification",
                              "the run cannot be loaded; train a new one")
    try:
        step = int(which)
    except ValueError:
        raise CheckpointError(f"--checkpoint {which!r} is not latest, best or a step number",
                              "write e.g. `--checkpoint latest`") from None
    match = [p for s, p in ckpts if s == step]
    if not match:
        raise CheckpointError(f"run `{run_dir.name}` has no checkpoint at step {step}",
                              f"steps available: {', '.join(str(s) for s, _ in sorted(ckpts))}")
    verify_checkpoint(match[0])
    return match[0]


def _find_best(run_dir: Path) -> Path:
    root = checkpoints_dir(run_dir)
    for name in (BEST, f"{BEST}.tmp", f"{BEST}.old"):
        if (root / name / "manifest.json").is_file():
            verify_checkpoint(root / name)
            return root / name
    best_step = read_run_info(run_dir).get("best_step")
    match = [p for s, p in list_checkpoints(run_dir) if s == best_step]
    if match:
        verify_checkpoint(match[0])
        return match[0]
    raise CheckpointError(f"run `{run_dir.name}` has no saved weights of its best evaluation"
                          + (f" (step {best_step})" if best_step is not None else ""),
                          "use `--checkpoint latest` or a step number; runs keep `checkpoints/best/` from their "
                          "first evaluation on")


def make_latest(run_dir: Path, ckpt: Path) -> bool:
    """Make ``ckpt`` the newest checkpoint (rewrite its manifest with the next ``seq``), so that
    after resuming from an older checkpoint the abandoned later ones are no longer ``latest``.

    Returns:
        Whether the manifest was rewritten (False when ``ckpt`` was the newest already).

    Raises:
        CheckpointError: its manifest is malformed.
        OSError: the manifest cannot be written.
    """
    manifest = read_manifest(ckpt)
    ckpts = list_checkpoints(run_dir)
    if ckpts and ckpts[-1][1] == ckpt:
        return False
    manifest["seq"] = next_seq(run_dir)
    write_json_atomic(ckpt / "manifest.json", manifest)
    return True


def next_seq(run_dir: Path) -> int:
    """One more than the highest write sequence number among the run's checkpoints."""
    return 1 + max((q for q in (_seq(p) for _, p in list_checkpoints(run_dir)) if q != _UNREADABLE), default=0)


# ---------------------------------------------------------------------------------------------
# Saving


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a bit-exact resume needs.

    ``eval_pending`` marks a checkpoint written while the evaluation due at its step was cut short by
    a signal: resuming runs that evaluation first.
    """

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    schedule_steps: int = 0
    loader: Optional[dict] = None
    val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    eval_pending: bool = False


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, not by position (the form FSDP2's full state
    dict has too), so a checkpoint loads into any world size and any wrapping of the model.

    Returns:
        ``{"state": {name: {"step", "exp_avg", ...}}, "param_groups": [{..., "params": [names]}]}``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    state = {order[i]: {k: v for k, v in st.items()} for i, st in sd["state"].items()}
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]) -> None:
    """Load what :func:`named_optimizer_state` gives (or the position-keyed form of older checkpoints).

    Raises:
        CheckpointError: the saved parameter groups do not name this model's parameters.
    """
    groups = named["param_groups"]
    if any(isinstance(i, int) for g in groups for i in g["params"]):  # written before names (format 1)
        optimizer.load_state_dict(named)
        return
    names = {id(p): n for n, p in model.named_parameters()}
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if len(groups) != len(current) or any(set(g["params"]) != set(c) for g, c in zip(groups, current)):
        raise CheckpointError("the optimizer state in the checkpoint names other parameters than this model has",
                              "resume with the config the run was trained with")
    index = {n: i for i, n in enumerate(n for c in current for n in c)}
    state = {index[n]: st for n, st in named["state"].items() if n in index}
    pg = [dict(g, params=[index[n] for n in c]) for g, c in zip(groups, current)]
    optimizer.load_state_dict({"state": state, "param_groups": pg})


def _optimizer_to_flat(named: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {}
    for name, st in named["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{name}.{key}"] = t.detach().contiguous().cpu()
    return tensors, named["param_groups"]


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    by_index = any(isinstance(i, int) for g in groups for i in g["params"])
    state: dict[Any, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, field_ = key.split(".", 1)[1].rsplit(".", 1)
        state.setdefault(int(name) if by_index else name, {})[field_] = t
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch CPU and CUDA as tensors, Python and NumPy as JSON-safe lists."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` gave."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "python" in meta:
        v, s, g = meta["python"]
        random.setstate((v, tuple(s), g))
    if "numpy" in meta:
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _rng_files(ranks: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Rank 0's states under their plain names, rank r's under ``rank<r>/``; JSON parts apart."""
    tensors: dict[str, torch.Tensor] = {}
    by_rank: dict[str, Any] = {}
    for r, (t, meta) in enumerate(ranks):
        prefix = "" if r == 0 else f"rank{r}/"
        tensors.update({prefix + k: v.contiguous().cpu() for k, v in t.items()})
        if r:
            by_rank[str(r)] = meta
    return tensors, ranks[0][1], by_rank


def rng_of_rank(tensors: dict[str, torch.Tensor], data: dict[str, Any], rank: int) -> tuple[dict, dict]:
    """The RNG states a checkpoint saved for ``rank`` (rank 0's when it saved fewer ranks)."""
    prefix = f"rank{rank}/"
    if rank and any(k.startswith(prefix) for k in tensors):
        return ({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                data.get("rng_by_rank", {}).get(str(rank), {}))
    return {k: v for k, v in tensors.items() if "/" not in k}, data.get("rng", {})


def first_non_finite(model: torch.nn.Module | dict[str, torch.Tensor]) -> Optional[str]:
    """Name of the first parameter or buffer (of a module, or in a dict of tensors) holding NaN or
    Inf, or ``None`` when all are finite."""
    tensors = model if isinstance(model, dict) else model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def _os_reason(exc: BaseException) -> str:
    """The OS's words for a write failure (``No space left on device``), from an OSError or the
    ``IoError(Os { ..., message: "..." })`` text of a SafetensorError."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    m = re.search(r"os error (\d+)", str(exc))  # safetensors: "I/O error: File too large (os error 27)"
    if m:
        return os.strerror(int(m.group(1)))
    m = re.search(r'message: "([^"]+)"', str(exc))
    return m.group(1) if m else str(exc)


def _write_error(exc: BaseException, folder: Path) -> CheckpointError:
    from shutil import disk_usage

    try:
        free = disk_usage(folder if folder.exists() else folder.parent).free
        room = f"{free / 2**20:,.1f} MiB free there"
    except OSError:
        room = "free space unknown"
    return CheckpointError(f"cannot write checkpoint `{folder}`: {_os_reason(exc)} ({room})",
                           "free disk space or fix the folder's permissions; the earlier checkpoints are intact, "
                           "and `tfkit resume RUN` continues from the newest")


def _write_folder(final: Path, write_files: Callable[[Path], None], kind: str, step: int, seq: int) -> Path:
    """Write a checkpoint folder atomically: ``write_files(tmp)``, fsync, manifest, commit.

    Raises:
        CheckpointError: the disk is full or not writable (an incomplete tmp folder is removed; the
            previous checkpoints are untouched).
    """
    tmp = final.with_name(final.name + ".tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        faults.hit("save.begin", step)
        write_files(tmp)
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        faults.hit("save.files", step)
        manifest = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, "seq": seq, "files": files,
                    "tfkit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        faults.hit("save.manifest", step)
        _commit(tmp, final)
    except BaseException as exc:
        if not (tmp / "manifest.json").is_file():  # incomplete: remove; a complete one is promoted by recovery
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise _write_error(exc, final) from exc
        raise
    return final


def save_checkpoint(run_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any], state: TrainState, scaler: Any = None,
                    meta: Optional[dict[str, Any]] = None,
                    rng: Optional[list[tuple[dict[str, torch.Tensor], dict[str, Any]]]] = None) -> Path:
    """Write ``checkpoints/step-N/`` atomically; an existing ``step-N/`` is replaced only once the new
    one is complete.

    Args:
        model: the module, or its weights already gathered to this process (one key per tensor:
            ``LanguageModel.state_dict_for_save`` form).
        optimizer: the optimizer (of ``model``, which must then be a module), or its state keyed by
            parameter name (:func:`named_optimizer_state`, or FSDP2's full optimizer state dict).
        meta: JSON-safe facts stored in ``state.json`` (the resolved ``config``, the ``data``
            fingerprints) for ``tfkit resume`` to check against.
        rng: each rank's :func:`rng_state`, rank 0 first; default: this process's alone.

    Raises:
        CheckpointError: the disk is full or not writable (names the folder and the free space; the
            earlier checkpoints are intact).
    """
    named = optimizer if isinstance(optimizer, dict) else named_optimizer_state(model, optimizer)  # type: ignore[arg-type]
    ranks = rng if rng is not None else [rng_state()]

    def write(tmp: Path) -> None:
        _save_weights(model, tmp / "model.safetensors")
        opt_tensors, groups = _optimizer_to_flat(named)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta, by_rank = _rng_files(ranks)
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        payload = {"format_version": FORMAT_VERSION, "tfkit_version": __version__, **state.__dict__,
                   "optimizer_param_groups": groups,
                   "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                   "rng": rng_meta, "rng_by_rank": by_rank, "world_size": len(ranks), **(meta or {})}
        (tmp / "state.json").write_text(json.dumps(payload))

    final = checkpoints_dir(run_dir) / step_dir_name(state.step)
    return _write_folder(final, write, "full", state.step, next_seq(run_dir))


def _save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    if isinstance(model, dict):
        save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, str(path), metadata={"format": "pt"})
    else:
        save_model(model, str(path))


def save_weights(run_dir: Path, tensors: dict[str, torch.Tensor], step: int, info: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-N/`` holding weights alone (kind ``weights``), as ``tfkit import``
    does for step 0: enough for ``eval``, ``generate``, ``export`` and ``--init-from``, not for
    ``resume`` (no optimizer state).

    Raises:
        CheckpointError: the disk is full or not writable.
    """
    def write(tmp: Path) -> None:
        _save_weights(tensors, tmp / "model.safetensors")
        (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "tfkit_version": __version__,
                                                    "step": step, **info}))

    return _write_folder(checkpoints_dir(run_dir) / step_dir_name(step), write, "weights", step, next_seq(run_dir))


def save_best(run_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor], step: int, info: dict[str, Any]) -> Path:
    """Write the weights of a new best evaluation to ``checkpoints/best/`` (atomically, replacing the
    previous best only once complete).

    Args:
        model: the module, or its gathered weights (as for :func:`save_checkpoint`).
        info: JSON-safe facts for its ``state.json`` (``val_loss``, ``bits_per_byte``...).

    Raises:
        CheckpointError: the disk is full or not writable.
    """
    def write(tmp: Path) -> None:
        _save_weights(model, tmp / "model.safetensors")
        faults.hit("best.files", step)
        (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "tfkit_version": __version__,
                                                    "step": step, **info}))

    return _write_folder(checkpoints_dir(run_dir) / BEST, write, "weights", step, 0)


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[int]:
    """Delete the full checkpoints other than the ``keep_last`` written last (``best/`` is separate;
    a checkpoint whose manifest is malformed is left alone).

    Each is first renamed to ``*.del`` (atomic), then removed, so an interrupted prune never leaves a
    half-deleted folder that looks like a checkpoint.

    Returns:
        The steps removed.
    """
    removed = []
    # a checkpoint with a malformed manifest is left for a person to look at, never pruned
    ckpts = [(s, p) for s, p in list_checkpoints(run_dir) if _STEP_DIR.match(p.name) and _seq(p) != _UNREADABLE]
    for step, path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        doomed = path.with_name(path.name + ".del")
        with contextlib.suppress(OSError):
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(step)
    return removed


# ---------------------------------------------------------------------------------------------
# Loading


def load_weights(model: torch.nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load ``model.safetensors`` into ``model`` with strict key matching.

    Raises:
        CheckpointError: unreadable file, or missing/unexpected keys, or a shape mismatch.
    """
    path = ckpt / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"`{path}`: cannot read weights ({exc})", "the checkpoint is corrupt; use an earlier one") from None
    except RuntimeError as exc:  # size mismatch
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[-1] if first else str(exc))
        raise CheckpointError(f"`{path}` does not fit the model: {detail}",
                              "the run's config.yaml and its weights disagree") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {sorted(missing)[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {sorted(unexpected)[:5]}")
        raise CheckpointError(f"`{path}` does not match the model: {'; '.join(parts)}",
                              "the run's config.yaml and its weights disagree")


@dataclass
class InitReport:
    """What :func:`load_matching_weights` did: tensor names loaded, left fresh, and skipped.

    Attributes:
        loaded: names copied from the checkpoint (same name and shape).
        new: names of the model the checkpoint lacks; they keep their fresh init.
        mismatched: ``name (checkpoint shape) != (model shape)``; they keep their fresh init.
        unused: checkpoint names the model has no place for.
        loaded_params, new_params: parameter counts of ``loaded`` and of ``new`` + ``mismatched``.
    """

    loaded: list[str]
    new: list[str]
    mismatched: list[str]
    unused: list[str]
    loaded_params: int
    new_params: int


def load_matching_weights(model: torch.nn.Module, ckpt: Path) -> InitReport:
    """Initialise ``model`` from another run's weights where names and shapes match.

    This is how a trained ``llama`` run becomes the start of a ``mod`` or ``dtf`` run (the
    "transfer" mode of the Dynamic Transformer training guide): shared blocks, embedding and norms
    are copied, new modules (routers, prior FFNs, encoder, stream mixers) keep their fresh init.

    Raises:
        CheckpointError: ``model.safetensors`` unreadable.
    """
    path = ckpt / "model.safetensors"
    try:
        source = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"`{path}`: cannot read weights ({exc})", "the checkpoint is corrupt; use an earlier one") from None
    own = model.state_dict()
    loaded, new, mismatched = [], [], []
    loaded_n = new_n = 0
    with torch.no_grad():
        for name, tensor in own.items():
            src = source.get(name)
            if src is None:
                new.append(name)
                new_n += tensor.numel()
            elif tuple(src.shape) != tuple(tensor.shape):
                mismatched.append(f"{name} {tuple(src.shape)} != {tuple(tensor.shape)}")
                new_n += tensor.numel()
            else:
                tensor.copy_(src.to(tensor.dtype))
                loaded.append(name)
                loaded_n += tensor.numel()
    unused = sorted(set(source) - set(own))
    return InitReport(loaded, new, mismatched, unused, loaded_n, new_n)


def load_state(ckpt: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint as a dict.

    Raises:
        CheckpointError: unreadable or of an unknown format version.
    """
    try:
        data = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"`{ckpt / 'state.json'}` is unreadable: {exc}", "use an earlier checkpoint") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"`{ckpt}` has checkpoint format {data.get('format_version')}, this tfkit reads {FORMAT_VERSION}",
                              "use the tfkit version that wrote it")
    return data


@dataclass
class TrainingFiles:
    """A full checkpoint read into memory, not yet applied to a model (every rank reads its own).

    Attributes:
        weights: tensors of ``model.safetensors`` (on the requested device; empty when not read).
        optimizer: the optimizer state keyed by parameter name (position-keyed in older checkpoints).
        state: the loop state.
        data: the whole ``state.json``.
        rng: the tensors of ``rng.safetensors`` (every rank's).
    """

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: TrainState
    data: dict[str, Any]
    rng: dict[str, torch.Tensor]

    @property
    def world_size(self) -> int:
        """How many ranks wrote it (1 for checkpoints from before distributed training)."""
        return int(self.data.get("world_size", 1))


def read_training_state(ckpt: Path, device: str | torch.device = "cpu", weights: bool = True) -> TrainingFiles:
    """Read a full checkpoint's files (``weights=False``: all but ``model.safetensors``, for a caller
    that loads it into a module itself).

    Raises:
        CheckpointError: any file unreadable, or ``ckpt`` holds weights only (``best/``).
    """
    if read_manifest(ckpt)["kind"] != "full":
        raise CheckpointError(f"`{ckpt}` holds weights only, not the optimizer and data state a resume needs",
                              "resume from a step checkpoint: `--checkpoint latest` or a step number")
    data = load_state(ckpt)
    try:
        tensors = load_file(str(ckpt / "model.safetensors"), device=str(device)) if weights else {}
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors"), device=str(device))
        named = _optimizer_from_flat(opt_tensors, data["optimizer_param_groups"])
        rng_tensors = load_file(str(ckpt / "rng.safetensors"))
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"`{ckpt}`: cannot read its weights, optimizer or RNG state ({exc})",
                              "use an earlier checkpoint") from None
    fields = TrainState.__dataclass_fields__
    return TrainingFiles(tensors, named, TrainState(**{k: v for k, v in data.items() if k in fields}), data, rng_tensors)


def restore_extras(files: TrainingFiles, optimizer: torch.optim.Optimizer, scaler: Any = None, rank: int = 0) -> None:
    """After the weights and optimizer state are in: the grad scaler and this rank's RNG states, and
    the optimizer's ``step`` counters moved back to the CPU where non-fused AdamW keeps them."""
    for st in optimizer.state.values():
        if "step" in st and torch.is_tensor(st["step"]) and not optimizer.defaults.get("fused"):
            st["step"] = st["step"].cpu()
    if scaler is not None and files.data.get("grad_scaler"):
        scaler.load_state_dict(files.data["grad_scaler"])
    set_rng_state(*rng_of_rank(files.rng, files.data, rank))


def load_training_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None,
                        device: str | torch.device = "cpu") -> TrainState:
    """Restore weights, optimizer, grad scaler and RNG states from ``ckpt`` into one process; return
    the loop state.

    Raises:
        CheckpointError: any file unreadable or inconsistent with the model, or ``ckpt`` holds
            weights only (``best/``).
    """
    files = read_training_state(ckpt, device, weights=False)
    load_weights(model, ckpt, device)
    try:
        load_named_optimizer_state(model, optimizer, files.optimizer)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"`{ckpt}`: cannot restore the optimizer state ({exc})", "use an earlier checkpoint") from None
    restore_extras(files, optimizer, scaler)
    return files.state
