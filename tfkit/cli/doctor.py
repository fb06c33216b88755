"""`tfkit doctor`: can this machine train, on what, and what would `--preset auto` choose?

Every check is a small function returning :class:`Check` rows (status ``ok``/``warn``/``fail``,
a detail, and a hint for anything not ok). :func:`gather` runs them all; :func:`command` renders
them as a table on stderr or as JSON on stdout, and exits 1 (through the CLI's error boundary,
with a ``hint:`` line) when a required check fails.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from tfkit.cli.options import JsonOpt
from tfkit.errors import HardwareError, TfkitError

if TYPE_CHECKING:  # tfkit.hardware (and pydantic) load only when doctor runs, keeping `tfkit --help` fast
    from tfkit.hardware import Hardware

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 4)
LOW_DISK_BYTES = 5 * 10**9
"""Free space in the data dir below which doctor warns (5 GB)."""

_GIB = 1024**3

STATUS_TEXT = {"ok": "ok", "warn": "warn", "fail": "FAIL"}
_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


@dataclass
class Check:
    """One row of the report.

    Attributes:
        name: what was checked (``python``, ``torch``, ``GPU 0``, ``auto: preset``...).
        status: ``"ok"``, ``"warn"`` (training runs, but look at this) or ``"fail"`` (training cannot run).
        detail: what was found, and why it matters.
        hint: what to do about a warn or fail (a command in backticks), else empty.
    """

    name: str
    status: str
    detail: str
    hint: str = ""


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# The checks


def check_python(hw: Hardware) -> Check:
    """Python >= 3.10 is required."""
    if _version_tuple(hw.python_version) < MIN_PYTHON:
        return Check("python", "fail", f"{hw.python_version}: tfkit needs Python >= 3.10",
                     "install Python 3.10 or newer and reinstall tfkit in it (`pip install tfkit`)")
    return Check("python", "ok", hw.python_version)


def check_torch(hw: Hardware) -> Check:
    """torch must be importable; older than 2.4 is a warning."""
    if hw.torch_version is None:
        return Check("torch", "fail", "not importable", "install PyTorch: `pip install torch`")
    if _version_tuple(hw.torch_version) < MIN_TORCH:
        return Check("torch", "warn", f"{hw.torch_version}: older than the 2.4 tfkit is tested with",
                     "upgrade with `pip install -U torch`")
    return Check("torch", "ok", hw.torch_version)


def check_cuda(hw: Hardware) -> Check:
    """CUDA and cuDNN as torch was built with them, and whether a GPU is visible."""
    if hw.gpus:
        cudnn = f", cuDNN {hw.cudnn_version}" if hw.cudnn_version else ", no cuDNN"
        return Check("CUDA / cuDNN", "ok", f"CUDA {hw.cuda_version}{cudnn}; {len(hw.gpus)} GPU(s) visible")
    if hw.cuda_version:
        return Check("CUDA / cuDNN", "warn", f"torch is built for CUDA {hw.cuda_version} but no GPU is visible; "
                     "training runs on the CPU", "check the driver with `nvidia-smi`, and `CUDA_VISIBLE_DEVICES`")
    if hw.torch_version is None:
        return Check("CUDA / cuDNN", "warn", "unknown: torch is not importable", "install torch first")
    if hw.mps:
        return Check("CUDA / cuDNN", "ok", "not available (this torch has no CUDA); Apple MPS is used instead")
    from tfkit import hardware

    if not os.environ.get(hardware.FAKE_ENV) and hardware.nvidia_driver_present():
        return Check("CUDA / cuDNN", "warn", f"an NVIDIA driver is installed but torch {hw.torch_version} is a "
                     "CPU-only build; training runs on the CPU",
                     "install a CUDA build of torch: see https://pytorch.org/get-started/locally/")
    return Check("CUDA / cuDNN", "ok", f"not available (no NVIDIA GPU; torch {hw.torch_version} is CPU-only); "
                 "training runs on the CPU")


def check_tokenizers(hw: Hardware) -> Check:
    """The HF ``tokenizers`` package must be importable (it trains and applies the BPE)."""
    if hw.tokenizers_version is None:
        return Check("tokenizers", "fail", "not importable", "install it: `pip install tokenizers`")
    return Check("tokenizers", "ok", hw.tokenizers_version)


def check_flash_attn(hw: Hardware) -> Check:
    """flash-attn: importable and usable on a GPU here, or why not (optional)."""
    ampere = [g for g in hw.gpus[:1] if g.capability >= (8, 0)]  # training uses GPU 0
    if hw.flash_attn is not None:
        if ampere:
            return Check("flash-attn", "ok", f"{hw.flash_attn}, usable on {ampere[0].name} in bf16/fp16")
        why = "no CUDA GPU" if not hw.gpus else f"{hw.gpus[0].name} has compute capability {hw.gpus[0].capability_str}"
        return Check("flash-attn", "warn", f"{hw.flash_attn} importable but not usable here: it needs a CUDA GPU "
                     f"with compute capability >= 8.0 ({why}); PyTorch SDPA is used", "nothing to do; SDPA works everywhere")
    if hw.flash_attn_reason.startswith("installed but not importable"):
        return Check("flash-attn", "warn", f"{hw.flash_attn_reason}; PyTorch SDPA is used",
                     "reinstall it against this torch and CUDA: `pip install --force-reinstall 'tfkit[flash]'`")
    if ampere:
        from tfkit.hardware import FLASH_INSTALL_HINT

        return Check("flash-attn", "warn", f"{hw.flash_attn_reason}; {ampere[0].name} could use it "
                     "(PyTorch SDPA is used meanwhile)", f"install it: {FLASH_INSTALL_HINT}")
    return Check("flash-attn", "ok", f"{hw.flash_attn_reason} (optional: only used on CUDA GPUs with compute "
                 "capability >= 8.0; PyTorch SDPA is used)")


def check_devices(hw: Hardware) -> list[Check]:
    """CPU cores and RAM; each CUDA GPU's name, memory, compute capability and bf16; MPS."""
    rows = []
    ram = f"{hw.cpu_cores} cores, {_gib(hw.ram_bytes)} RAM" if hw.ram_bytes else f"{hw.cpu_cores} cores, RAM unknown"
    if hw.ram_bytes and hw.ram_bytes < 4 * _GIB:
        rows.append(Check("CPU", "warn", f"{ram}: little memory for training",
                          "close other programs, or train with `--preset nano`"))
    else:
        rows.append(Check("CPU", "ok", ram))
    for g in hw.gpus:
        detail = (f"{g.name}, {_gib(g.memory_bytes)}, compute capability {g.capability_str}, "
                  f"bf16: {'yes' if g.bf16 else 'no'}")
        if g.capability < (7, 0):
            rows.append(Check(f"GPU {g.index}", "warn", f"{detail}; no tensor cores: fp32 only, no torch.compile",
                              "expect slow training; a GPU with compute capability >= 7.0 is much faster"))
        else:
            rows.append(Check(f"GPU {g.index}", "ok", detail))
    rows.append(Check("MPS", "ok", "available (Apple silicon)" if hw.mps else "not available (Apple silicon only)"))
    return rows


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_disk(path: Optional[Path] = None) -> Check:
    """Free space in the data dir (or its nearest existing parent); it must be writable, and < 5 GB warns."""
    from tfkit.paths import data_dir

    target = Path(path) if path is not None else data_dir()
    where = _nearest_existing(target)
    shown = f"`{target}`" + ("" if where == target.absolute() else f" (to be created; checked `{where}`)")
    hint_dir = "set `TFKIT_HOME` to a writable folder with space, e.g. `export TFKIT_HOME=~/tfkit`"
    if where.exists() and not where.is_dir():
        return Check("disk", "fail", f"{shown}: `{where}` is a file, not a folder", hint_dir)
    if not _writable(where):
        return Check("disk", "fail", f"data dir {shown} is not writable", hint_dir)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Check("disk", "warn", f"free space in {shown} unknown ({exc.strerror or exc})", hint_dir)
    detail = f"{_gib(free)} free in data dir {shown}"
    if free < LOW_DISK_BYTES:
        return Check("disk", "warn", f"{detail}: below 5 GB; checkpoints may not fit",
                     f"free some space, or {hint_dir}")
    return Check("disk", "ok", detail)


def auto_choice(hw: Hardware) -> tuple[list[Check], dict[str, Any]]:
    """What ``--preset auto`` with ``system.*=auto`` would choose here, as rows and as a JSON dict."""
    from tfkit import config, hardware

    auto: dict[str, Any] = {"preset": None, "device": None, "precision": None, "attention": None,
                            "compile": None, "reasons": {}, "memory_estimate_bytes": None,
                            "memory_budget_bytes": None, "presets": []}
    try:
        rt = hardware.resolve(config.SystemConfig(), hw)
    except HardwareError as exc:
        return [Check("auto", "fail", exc.message, exc.hint)], auto
    auto.update(rt.to_dict())
    rows = []
    try:
        choice = hardware.choose_preset(hw, rt, vocab_size=config.DataConfig().default_vocab_size)
    except HardwareError as exc:
        rows.append(Check("auto: preset", "fail", exc.message, exc.hint))
        auto["reasons"]["preset"] = exc.message
    else:
        auto.update(preset=choice.name, memory_estimate_bytes=choice.estimate_bytes,
                    memory_budget_bytes=choice.budget_bytes,
                    presets=[{"name": n, "estimate_bytes": e, "fits": f} for n, e, f in choice.table])
        auto["reasons"]["preset"] = choice.reason
        rows.append(Check("auto: preset", "ok", f"{choice.name}: {choice.reason}"))
    def why(key: str) -> str:
        return rt.reasons[key].removeprefix("auto: ")

    rows.append(Check("auto: device", "ok", f"{rt.device}: {why('device')}"))
    prec = rt.precision + (" + grad scaler" if rt.needs_grad_scaler else "")
    rows.append(Check("auto: precision", "ok", f"{prec}: {why('precision')}"))
    rows.append(Check("auto: attention", "ok", f"{rt.attention}: {why('attention')}"))
    rows.append(Check("auto: compile", "ok", f"{'on' if rt.compile else 'off'}: {why('compile')}"))
    rows.append(_distributed_row(hw, rt, auto))
    return rows, auto


def _distributed_row(hw: Hardware, rt, auto: dict[str, Any]) -> Check:
    """How this machine's GPUs would train together, and the command that does it."""
    from tfkit import config, hardware

    n = len(hw.gpus)
    if n < 2:
        auto.update(distributed="none", world_size=1, torchrun_command=None)
        return Check("auto: distributed", "ok", f"one process ({n} GPU{'s' if n != 1 else ''}); to train on several "
                     "machines, start `torchrun` on each (see the README)")
    preset = auto.get("preset") or "nano"
    cfg = config.load(preset=preset, overrides=[f"model.vocab_size={config.DataConfig().default_vocab_size}"])
    multi = hardware.resolve_distributed(cfg, hw, rt, n)
    command = hardware.torchrun_command(n)
    auto.update(distributed=multi.distributed, world_size=n, torchrun_command=command)
    auto["reasons"]["distributed"] = multi.reasons["distributed"]
    return Check("auto: distributed", "ok", f"{multi.distributed} over {n} GPUs "
                 f"({multi.reasons['distributed'].removeprefix('auto: ')}): `{command}` "
                 f"(or `tfkit train --preset auto --nproc-per-node {n}`)")


def gather(hw: Hardware) -> tuple[list[Check], dict[str, Any]]:
    """Run every check on ``hw``; returns the rows and the ``auto`` dict of :func:`auto_choice`."""
    checks = [check_python(hw), check_torch(hw), check_cuda(hw), check_tokenizers(hw), check_flash_attn(hw)]
    checks += check_devices(hw)
    checks.append(check_disk())
    auto_rows, auto = auto_choice(hw)
    return checks + auto_rows, auto


# ---------------------------------------------------------------------------------------------
# Rendering


def _render_table(checks: list[Check]) -> None:
    from rich.table import Table
    from rich.text import Text

    from tfkit.cli.output import err

    table = Table(title="tfkit doctor", title_justify="left", show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(Text(c.name), Text(STATUS_TEXT[c.status], style=_STATUS_STYLE[c.status]), Text(c.detail))
    err.print(table)
    for c in checks:
        if c.status == "warn" and c.hint:
            line = Text("hint ", style="bold")
            line.append(f"({c.name}): {c.hint}", style="")
            err.print(line)


def command(json_out: JsonOpt = False) -> None:
    """Check that this machine can train, and show what `--preset auto` would choose.

    Checks Python, torch, CUDA/cuDNN, tokenizers, flash-attn (usable here, or why not), the devices (CPU cores and RAM; each GPU's memory, compute capability and bf16 support; Apple MPS) and the free disk space in the data dir. Then shows the preset, precision, attention backend and compile setting that `--preset auto` would pick, each with its reason.

    Exits 1 when something required is broken (Python < 3.10, torch or tokenizers not importable, data dir not writable), with a hint saying how to fix it.

    Example: `tfkit doctor`, or `tfkit doctor --json | jq .auto`
    """  # noqa: E501 (Typer keeps line breaks inside a paragraph, so each paragraph is one line)
    from tfkit import hardware
    from tfkit.cli.output import print_json

    hw = hardware.detect()
    checks, auto = gather(hw)
    failed = [c for c in checks if c.status == "fail"]
    if json_out:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks], "hardware": hw.to_dict(), "auto": auto})
    else:
        _render_table(checks)
    if failed:
        names = ", ".join(c.name for c in failed)
        detail = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        raise TfkitError(f"{len(failed)} required check(s) failed ({names}): {detail}",
                         "; ".join(c.hint for c in failed if c.hint))
    if not json_out:
        from rich.text import Text

        from tfkit.cli.output import err

        err.print(Text(f"ok: training can run here; `tfkit train --preset auto` would train `{auto['preset']}` "
                       f"on {auto['device']} in {auto['precision']}"))
