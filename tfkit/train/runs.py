"""The run folder: find it, lock it, its ``run.json`` summary and history, and ``env.json``.

A run folder ``<data dir>/runs/<name>/`` holds ``config.yaml`` (resolved), ``tokenizer.json``,
``run.json``, ``env.json``, ``metrics.jsonl``, ``train.log`` and ``checkpoints/`` (see
:mod:`tfkit.train.checkpoint`).

- ``run.json``: name, arch, params, ``status`` (created | training | interrupted | finished |
  failed | diverged), step, validation figures, and ``history``: one entry per ``train`` /
  ``resume`` with its command line and the config changes it made.
- ``env.json``: one entry per session (``train`` or ``resume``) with what produced the checkpoints:
  Python, torch, CUDA/cuDNN, tokenizers, numpy and safetensors versions, the device, the command
  line, and each data file's fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from tfkit import __version__
from tfkit.errors import CheckpointError
from tfkit.fsutil import write_text_atomic
from tfkit.paths import runs_dir

if TYPE_CHECKING:
    from tfkit.hardware import Runtime

STATUSES = ("created", "training", "interrupted", "finished", "failed", "diverged")
"""Values of ``run.json``'s ``status``."""


def resolve_run(name_or_path: str) -> Path:
    """The folder of a run given its name (under ``runs_dir()``) or a path.

    Raises:
        CheckpointError: no such run.
    """
    p = Path(name_or_path).expanduser()
    candidates = [p] if (p.is_absolute() or os.sep in name_or_path or name_or_path.startswith(".")) else [runs_dir() / name_or_path, p]
    for c in candidates:
        if (c / "run.json").is_file() or (c / "config.yaml").is_file():
            return c
    known = sorted(d.name for d in runs_dir().glob("*") if (d / "run.json").is_file()) if runs_dir().is_dir() else []
    import difflib

    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise CheckpointError(f"no run named {name_or_path!r} in `{runs_dir()}`",
                          f"{hint}`tfkit list-models` lists the runs; or pass a run folder's path")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run (empty dict when missing or unreadable)."""
    try:
        data = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and ``os.replace``.

    Raises:
        OSError: the folder is not writable or the disk is full (the temporary file is removed).
    """
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_run_config(run_dir: Path, cfg, name: Optional[str] = None) -> None:
    """Write the run's ``config.yaml`` (a :class:`tfkit.config.RunConfig`) atomically; ``name`` is
    the run's name for the header comment (default: the folder's).

    Raises:
        OSError: the folder is not writable or the disk is full (the old file is left as it was).
    """
    from tfkit.config import to_yaml

    header = f"tfkit {__version__} run `{name or run_dir.name}`: the resolved config it trains with."
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg, header))


def update_run_info(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``run.json`` (atomically) and return the result.

    Raises:
        OSError: ``run.json`` cannot be written.
    """
    info = read_run_info(run_dir)
    info.update(fields)
    info["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(run_dir / "run.json", info)
    return info


def try_update_run_info(run_dir: Path, **fields: Any) -> bool:
    """:func:`update_run_info` that never raises (for marking a run failed while handling an error,
    possibly on a full disk); returns whether it was written."""
    try:
        update_run_info(run_dir, **fields)
        return True
    except (OSError, ValueError, TypeError):
        return False


def append_history(run_dir: Path, entry: dict[str, Any]) -> None:
    """Add one entry (``event``, ``time``, ``command`` are filled in) to ``run.json``'s ``history``.

    Raises:
        OSError: ``run.json`` cannot be written.
    """
    info = read_run_info(run_dir)
    history = info.get("history") if isinstance(info.get("history"), list) else []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command_line(), **entry})
    update_run_info(run_dir, history=history)


def command_line() -> str:
    """The command line of this process, shell-quoted (``tfkit train --preset nano``)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("tfkit", "__main__.py"):
        argv[0] = "tfkit"
    return " ".join(shlex.quote(a) for a in argv)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` so two processes never train one run.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale lock never
    blocks a resume.

    Raises:
        CheckpointError: another live process holds the lock (names its pid and host).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; carry on unlocked
        yield
        return
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise CheckpointError(f"run `{run_dir.name}` is locked by {holder}",
                                  "wait for that run to finish, or give this one another `--name`") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_is_held(run_dir: Path) -> bool:
    """Whether a live process on this host holds the run's lock (read from ``.lock``, without
    taking it, so a starting run is never disturbed)."""
    try:
        text = (run_dir / ".lock").read_text()
    except OSError:
        return False
    parts = text.split()
    if len(parts) < 4 or parts[0] != "pid" or not parts[1].isdigit():
        return False
    if parts[3] != socket.gethostname():
        return True  # another host's process: assume it lives
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def shown_status(run_dir: Path, info: dict[str, Any]) -> Optional[str]:
    """``run.json``'s status, with ``training`` shown as ``stopped`` when no process holds the run
    (it was killed: ``tfkit resume`` continues it)."""
    status = info.get("status")
    if status == "training" and not lock_is_held(run_dir):
        return "stopped"
    return status


# ---------------------------------------------------------------------------------------------
# Reproducibility: what produced a checkpoint


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or odd metadata: unknown
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(runtime: Optional["Runtime"] = None, gpu_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """Versions, device and command line of this process, JSON-safe.

    Args:
        runtime: the resolved runtime (device ``cpu``, ``cuda``, ``cuda:1``, ``mps``); default the CPU.
        gpu_names: names of the visible CUDA GPUs (from ``tfkit.hardware.detect()``).
    """
    import numpy
    import torch

    cudnn = None
    with contextlib.suppress(Exception):
        v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        cudnn = str(v) if v else None
    if runtime is None:
        from tfkit.hardware import Runtime

        runtime = Runtime(device="cpu", precision="fp32", attention="sdpa", compile=False)
    device = runtime.device
    if runtime.gpu_index is not None:
        index = runtime.gpu_index
        name = gpu_names[index] if index < len(gpu_names) else "CUDA GPU"
    elif runtime.device_type == "mps":
        name = f"Apple MPS ({platform.machine()})"
    else:
        name = _cpu_name()
    return {"tfkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn, "tokenizers": _version("tokenizers"),
            "numpy": numpy.__version__, "safetensors": _version("safetensors"), "platform": platform.platform(),
            "device": device, "device_name": name, "command": command_line()}


def record_session(run_dir: Path, session: dict[str, Any]) -> None:
    """Append one session (``environment()`` plus what the caller adds) to ``env.json``.

    Raises:
        OSError: ``env.json`` cannot be written.
    """
    path = run_dir / "env.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    sessions = data.get("sessions") if isinstance(data, dict) and isinstance(data.get("sessions"), list) else []
    sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), **session})
    write_json_atomic(path, {"sessions": sessions})


def data_fingerprints(cfg, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Fingerprints of what a run trains on: ``train`` and ``val`` token files (path, size, content
    fingerprint, the tokenizer hash in their header) and the run's ``tokenizer.json``.

    Raises:
        DataError: a token file is missing or malformed.
    """
    from tfkit.data.tokenfile import TokenFile

    out: dict[str, dict[str, Any]] = {}
    for key in ("train", "val"):
        path = getattr(cfg.data, key)
        if path:
            tf = TokenFile.open(path)
            out[key] = {"path": str(path), "bytes": Path(path).stat().st_size, "n_tokens": tf.header.n_tokens,
                        "tokenizer_hash": tf.header.tokenizer_hash, "fingerprint": tf.fingerprint()}
    tok = run_dir / "tokenizer.json"
    if tok.is_file():
        from tfkit.data.tokenizer import Tokenizer

        out["tokenizer"] = {"path": str(tok), "hash": Tokenizer.load(tok).hash}
    return out
