"""What this machine can do, and what tfkit will use: device, precision, attention kernel, compile.

This is the only module that asks CUDA or MPS about their capabilities or tries to import
``flash_attn``. Torch is imported lazily, inside :func:`detect`, so ``tfkit --help`` stays fast.

- :func:`detect` describes the machine (:class:`Hardware`, cached).
- :func:`resolve` turns the ``system`` config section (``auto`` or explicit choices) into a
  :class:`Runtime`, with a one-line reason for every choice; impossible explicit choices raise
  :class:`~tfkit.errors.HardwareError` with a hint.
- :func:`choose_preset` is what ``--preset auto`` picks, by estimated training memory.
- :func:`peak_flops` and :func:`device_memory_bytes` feed the dashboard (MFU, memory).

Override for tests and previews: set ``TFKIT_FAKE_HARDWARE`` to a JSON file holding the fields
of :class:`Hardware` (see :meth:`Hardware.to_dict`; missing fields take the values of a CPU-only
machine with this Python) or to the name of a built-in profile from :data:`FAKE_PROFILES`
(``h100``, ``v100``, ``gtx1080``, ``mps``, ``cpu``), e.g. ``TFKIT_FAKE_HARDWARE=h100 tfkit doctor``
shows what ``--preset auto`` would choose on an H100. Only detection is faked: training on a
faked GPU fails when torch is asked for it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tfkit import config
from tfkit.errors import HardwareError

FAKE_ENV = "TFKIT_FAKE_HARDWARE"
"""Environment variable naming a fake-hardware JSON file or a profile in :data:`FAKE_PROFILES`."""

MEMORY_FRACTION = 0.8
"""Share of device memory ``--preset auto`` lets a preset's training-memory estimate use."""

CPU_BF16_REASON = "bf16 matmuls measured 5x slower than fp32 on CPU"
FLASH_INSTALL_HINT = "`pip install 'tfkit[flash]'` (needs a CUDA GPU with compute capability >= 8.0)"

GiB = 1024**3


# ---------------------------------------------------------------------------------------------
# What the machine has


@dataclass(frozen=True)
class GPU:
    """One CUDA device as torch sees it.

    Attributes:
        index: CUDA device index (after ``CUDA_VISIBLE_DEVICES``).
        name: marketing name, e.g. ``NVIDIA H100 80GB HBM3``.
        memory_bytes: total device memory in bytes.
        capability: CUDA compute capability ``(major, minor)``, e.g. ``(9, 0)``.
        bf16: whether the GPU computes in bfloat16 natively (compute capability >= 8.0).
    """

    index: int
    name: str
    memory_bytes: int
    capability: tuple[int, int]
    bf16: bool

    @property
    def capability_str(self) -> str:
        """``"9.0"`` for capability ``(9, 0)``."""
        return f"{self.capability[0]}.{self.capability[1]}"


@dataclass(frozen=True)
class Hardware:
    """The machine tfkit runs on, as found by :func:`detect`.

    Attributes:
        python_version: e.g. ``"3.11.7"``.
        torch_version: e.g. ``"2.13.0+cpu"``; ``None`` when torch cannot be imported.
        cuda_version: CUDA version torch was built with (``"12.4"``), ``None`` for a CPU build.
        cudnn_version: cuDNN version (``"9.1.0"``), ``None`` without cuDNN.
        cpu_cores: CPU cores this process may use (scheduler affinity).
        ram_bytes: physical memory in bytes (capped by a cgroup limit when one is set).
        gpus: the visible CUDA GPUs.
        mps: whether Apple's Metal (MPS) backend is available.
        flash_attn: version of the importable ``flash_attn`` package, ``None`` when not importable.
        flash_attn_reason: one line: why flash-attn can or cannot be used.
        tokenizers_version: version of the HF ``tokenizers`` package, ``None`` when not importable.
    """

    python_version: str
    torch_version: Optional[str]
    cuda_version: Optional[str]
    cudnn_version: Optional[str]
    cpu_cores: int
    ram_bytes: int
    gpus: tuple[GPU, ...]
    mps: bool
    flash_attn: Optional[str]
    flash_attn_reason: str
    tokenizers_version: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the format of a ``TFKIT_FAKE_HARDWARE`` file)."""
        out = dataclasses.asdict(self)
        out["gpus"] = [dict(g, capability=list(g["capability"])) for g in out["gpus"]]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "fake hardware") -> "Hardware":
        """Build from a dict like :meth:`to_dict` gives; absent fields take CPU-only defaults.

        Raises:
            HardwareError: an unknown field or a malformed GPU entry.
        """
        hint = f"see `tfkit.hardware.Hardware.to_dict()` for the fields; or unset `{FAKE_ENV}`"
        if not isinstance(data, dict):
            raise HardwareError(f"{source}: must be a JSON object, not {type(data).__name__}", hint)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise HardwareError(f"{source}: unknown field(s) {', '.join(unknown)}", hint)
        values = dict(_software_baseline(), **data)
        gpus = []
        for i, g in enumerate(values.get("gpus") or []):
            try:
                cap = tuple(int(c) for c in g["capability"])
                if len(cap) != 2:
                    raise ValueError("capability must be [major, minor]")
                gpus.append(GPU(index=int(g.get("index", i)), name=str(g["name"]), memory_bytes=int(g["memory_bytes"]),
                                capability=cap, bf16=bool(g.get("bf16", cap >= (8, 0)))))
            except (KeyError, TypeError, ValueError) as exc:
                raise HardwareError(f"{source}: gpus[{i}] is malformed ({type(exc).__name__}: {exc})",
                                    "each GPU needs name, memory_bytes and capability [major, minor]") from None
        values["gpus"] = tuple(gpus)
        return cls(**values)


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _software_baseline() -> dict[str, Any]:
    """Field defaults for fake machines: this Python and installed packages, CPU only, no torch import."""
    return {
        "python_version": platform.python_version(),
        "torch_version": _dist_version("torch"),
        "cuda_version": None,
        "cudnn_version": None,
        "cpu_cores": _cpu_cores(),
        "ram_bytes": _ram_bytes(),
        "gpus": (),
        "mps": False,
        "flash_attn": None,
        "flash_attn_reason": "not installed",
        "tokenizers_version": _dist_version("tokenizers"),
    }


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_limit() -> Optional[int]:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _ram_bytes() -> int:
    """Physical memory in bytes: /proc/meminfo, else sysconf, else macOS sysctl; 0 if unknown."""
    total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024  # kB
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            total = 0
    if not total and sys.platform == "darwin":  # pragma: no cover - macOS only
        try:
            total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                       timeout=5).stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            total = 0
    limit = _cgroup_limit()
    if limit and (not total or limit < total):
        total = limit
    return total


def _cudnn_str(v: Optional[int]) -> Optional[str]:
    if not v:
        return None
    if v >= 90000:  # cuDNN 9: major*10000 + minor*100 + patch
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"  # cuDNN 8: major*1000 + minor*100 + patch


def _flash_attn() -> tuple[Optional[str], str]:
    """(version, reason) for the ``flash_attn`` package; imports it only when it is installed."""
    try:
        if importlib.util.find_spec("flash_attn") is None:
            return None, "not installed"
    except (ImportError, ValueError):
        return None, "not installed"
    try:
        import flash_attn  # noqa: F401  (imports CUDA kernels; fails on a CPU-only torch)
    except Exception as exc:  # ImportError, OSError from missing CUDA libraries, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"installed but not importable: {type(exc).__name__}: {first}"[:200]
    version = getattr(flash_attn, "__version__", None) or _dist_version("flash-attn") or "unknown"
    return str(version), f"flash-attn {version} importable"


def _detect_real() -> Hardware:
    base = _software_baseline()
    try:
        import torch
    except Exception as exc:  # not installed, or a broken install (missing shared libraries)
        base.update(torch_version=None, flash_attn_reason=f"torch is not importable ({type(exc).__name__})")
        return Hardware(**base)
    base["torch_version"] = str(torch.__version__)
    base["cuda_version"] = torch.version.cuda
    gpus: list[GPU] = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                cap = (int(p.major), int(p.minor))
                gpus.append(GPU(index=i, name=str(p.name), memory_bytes=int(p.total_memory), capability=cap,
                                bf16=cap >= (8, 0)))
            base["cudnn_version"] = _cudnn_str(torch.backends.cudnn.version())
    except Exception:  # a broken driver: report no GPU rather than crash; doctor shows the CUDA build
        gpus = []
    base["gpus"] = tuple(gpus)
    try:
        base["mps"] = bool(torch.backends.mps.is_available())
    except Exception:
        base["mps"] = False
    base["flash_attn"], base["flash_attn_reason"] = _flash_attn()
    return Hardware(**base)


_GPU_NAMES = {
    "h100": ("NVIDIA H100 80GB HBM3", 81_008 * 1024**2, (9, 0)),
    "v100": ("Tesla V100-SXM2-16GB", 16_160 * 1024**2, (7, 0)),
    "gtx1080": ("NVIDIA GeForce GTX 1080", 8_113 * 1024**2, (6, 1)),
}


def _fake_profile(name: str) -> dict[str, Any]:
    if name == "cpu":
        return {"cpu_cores": 2, "ram_bytes": 24 * GiB}
    if name == "mps":
        return {"cpu_cores": 8, "ram_bytes": 16 * GiB, "mps": True}
    gpu_name, mem, cap = _GPU_NAMES[name]
    return {"cuda_version": "12.4", "cudnn_version": "9.1.0", "cpu_cores": 16, "ram_bytes": 128 * GiB,
            "gpus": [{"index": 0, "name": gpu_name, "memory_bytes": mem, "capability": list(cap),
                      "bf16": cap >= (8, 0)}]}


FAKE_PROFILES = ("h100", "v100", "gtx1080", "mps", "cpu")
"""Built-in fake machines for ``TFKIT_FAKE_HARDWARE``: an H100 80 GB (9.0), a V100 16 GB (7.0),
a GTX 1080 8 GB (6.1), an Apple-silicon Mac (MPS, 16 GiB) and a 2-core, 24 GiB CPU box."""


def fake_hardware(spec: str | dict[str, Any]) -> Hardware:
    """A fake :class:`Hardware`: a profile name from :data:`FAKE_PROFILES`, a JSON file path, or a dict.

    Raises:
        HardwareError: the file is missing or is not valid JSON, or a field is unknown/malformed.
    """
    if isinstance(spec, dict):
        return Hardware.from_dict(spec)
    if spec.lower() in FAKE_PROFILES:
        return Hardware.from_dict(_fake_profile(spec.lower()), source=f"fake profile {spec}")
    path = Path(spec).expanduser()
    hint = f"point `{FAKE_ENV}` at a JSON file, or use a profile: {', '.join(FAKE_PROFILES)}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HardwareError(f"{FAKE_ENV}: cannot read `{path}` ({exc.strerror or exc})", hint) from None
    except json.JSONDecodeError as exc:
        raise HardwareError(f"{FAKE_ENV}: `{path}` is not valid JSON ({exc.msg} at line {exc.lineno})", hint) from None
    return Hardware.from_dict(data, source=f"`{path}`")


@functools.lru_cache(maxsize=16)
def _detect_cached(fake: str, stamp: int) -> Hardware:
    return fake_hardware(fake) if fake else _detect_real()


def detect() -> Hardware:
    """Describe this machine (cached for the process; ``detect.cache_clear()`` forgets it).

    Imports torch (about a second) and, when installed, ``flash_attn``. With ``TFKIT_FAKE_HARDWARE``
    set, returns that fake machine instead (see the module docstring); no torch import then.

    Raises:
        HardwareError: ``TFKIT_FAKE_HARDWARE`` names an unreadable or malformed file.
    """
    fake = os.environ.get(FAKE_ENV, "").strip()
    stamp = 0
    if fake and fake.lower() not in FAKE_PROFILES:
        try:
            stamp = Path(fake).expanduser().stat().st_mtime_ns
        except OSError:
            stamp = -1
    return _detect_cached(fake, stamp)


detect.cache_clear = _detect_cached.cache_clear  # type: ignore[attr-defined]


def nvidia_driver_present() -> bool:
    """True when an NVIDIA driver is installed (``/proc/driver/nvidia`` or ``nvidia-smi`` on PATH).

    Lets ``tfkit doctor`` tell "no GPU here" from "a GPU, but a CPU-only torch". Real machine only:
    not affected by ``TFKIT_FAKE_HARDWARE``, and not cached.
    """
    import shutil

    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


# ---------------------------------------------------------------------------------------------
# What tfkit will use


@dataclass(frozen=True)
class Runtime:
    """Resolved hardware choices for one run, each with a one-line reason.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` (GPU 0 / the current device), ``"cuda:N"`` or ``"mps"``.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + grad scaler).
        attention: ``"sdpa"`` (PyTorch), ``"flash"`` (flash-attn) or ``"eager"`` (reference).
        compile: whether to ``torch.compile`` the model.
        reasons: keys ``device``, ``precision``, ``attention``, ``compile`` (and ``distributed`` once
            :func:`resolve_distributed` ran): why each was chosen.
        distributed: ``"none"`` (one process), ``"ddp"`` or ``"fsdp"``.
        world_size: processes training together (torchrun's ``WORLD_SIZE``).
    """

    device: str
    precision: str
    attention: str
    compile: bool
    reasons: dict[str, str] = field(default_factory=dict)
    distributed: str = "none"
    world_size: int = 1

    @property
    def device_type(self) -> str:
        """``"cuda"`` for ``"cuda:1"``; what ``torch.autocast(device_type=...)`` wants."""
        return self.device.split(":", 1)[0]

    @property
    def gpu_index(self) -> Optional[int]:
        """CUDA device index (0 for plain ``"cuda"``), ``None`` off CUDA."""
        if self.device_type != "cuda":
            return None
        return int(self.device.split(":", 1)[1]) if ":" in self.device else 0

    @property
    def autocast_dtype(self) -> Optional[str]:
        """``None`` for fp32, else the torch dtype name for autocast: ``"bfloat16"`` or ``"float16"``."""
        return {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[self.precision]

    @property
    def autocast(self):
        """The autocast context of this precision on this device (a null context for fp32)."""
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.autocast_dtype))

    def configure(self) -> list[str]:
        """Set the process-wide switches this runtime implies, and say which.

        - CUDA: fp32 matmuls and convolutions run as TF32 on the tensor cores (what
          :func:`peak_flops` assumes for fp32).
        - CPU on glibc: large blocks are served from the heap and freed memory is kept
          (``mallopt(M_MMAP_MAX, 0)``, a high ``M_TRIM_THRESHOLD``), so the activations of each step
          reuse the previous step's pages instead of being mapped, page-faulted and zeroed anew;
          measured +24% tokens/s on the nano preset with 2 cores. ``TFKIT_MALLOC=default`` opts out.

        Returns:
            One line per switch set.
        """
        notes = []
        if self.device_type == "cuda":
            import torch

            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
            notes.append("TF32 matmuls for fp32")
        elif self.device_type == "cpu" and os.environ.get("TFKIT_MALLOC", "") != "default" and _keep_freed_memory():
            notes.append("glibc malloc keeps freed memory for reuse (TFKIT_MALLOC=default to opt out)")
        return notes

    def peak_memory_bytes(self) -> Optional[int]:
        """Memory training has used so far, in bytes: the CUDA allocator's peak, MPS's current
        allocation, or this process's peak resident set on the CPU; ``None`` when unknown."""
        import torch

        if self.device_type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device_type == "mps":
            return int(torch.mps.current_allocated_memory())
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):
            return None

    @property
    def needs_grad_scaler(self) -> bool:
        """True for fp16, whose narrow exponent range needs dynamic loss scaling."""
        return self.precision == "fp16"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the choices and their reasons."""
        return {"device": self.device, "precision": self.precision, "attention": self.attention,
                "compile": self.compile, "distributed": self.distributed, "world_size": self.world_size,
                "reasons": dict(self.reasons)}


def _keep_freed_memory() -> bool:
    """``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 2**30)`` where the C library has
    them (glibc); False elsewhere (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _gpu_desc(g: GPU) -> str:
    return f"{g.name} ({g.memory_bytes / GiB:.1f} GiB, compute capability {g.capability_str})"


def _resolve_device(want: str, hw: Hardware) -> tuple[str, str, Optional[GPU]]:
    if want == "auto":
        if hw.gpus:
            g = hw.gpus[0]
            more = (f" (+{len(hw.gpus) - 1} more: train on all with `tfkit train --nproc-per-node {len(hw.gpus)}`)"
                    if len(hw.gpus) > 1 else "")
            return "cuda", f"auto: CUDA GPU 0 is {_gpu_desc(g)}{more}", g
        if hw.mps:
            return "mps", "auto: no CUDA GPU; Apple MPS is available", None
        return "cpu", "auto: no CUDA GPU or Apple MPS found", None
    if want == "cuda":
        if not hw.gpus:
            why = ("torch is a CPU build" if hw.cuda_version is None
                   else f"torch was built with CUDA {hw.cuda_version} but no GPU is visible (driver? CUDA_VISIBLE_DEVICES?)")
            raise HardwareError(f"system.device=cuda was requested but there is no CUDA GPU: {why}",
                                "train on the CPU with `--set system.device=cpu` (or `--set system.device=auto`)")
        return "cuda", f"requested (system.device=cuda): {_gpu_desc(hw.gpus[0])}", hw.gpus[0]
    if want == "mps":
        if not hw.mps:
            raise HardwareError("system.device=mps was requested but Apple MPS is not available here "
                                "(it needs Apple silicon, macOS 12.3+ and an MPS-enabled torch)",
                                "use `--set system.device=cpu` (or `--set system.device=auto`)")
        return "mps", "requested (system.device=mps)", None
    return "cpu", "requested (system.device=cpu)", None


def _resolve_precision(want: str, device: str, gpu: Optional[GPU]) -> tuple[str, str]:
    if want == "auto":
        if gpu is not None:
            cap = gpu.capability_str
            if gpu.capability >= (8, 0):
                return "bf16", f"auto: compute capability {cap} >= 8.0 has bf16 tensor cores (fp32 range, no loss scaling)"
            if gpu.capability >= (7, 0):
                return "fp16", f"auto: compute capability {cap} has fp16 tensor cores but no bf16; fp16 with a grad scaler"
            return "fp32", f"auto: compute capability {cap} < 7.0 has no tensor cores for fp16/bf16 training"
        if device == "mps":
            return "fp32", "auto: fp32 on Apple MPS (mixed-precision autocast there is not reliably faster or stable)"
        return "fp32", f"auto: {CPU_BF16_REASON}"
    if want == "fp32":
        return "fp32", "requested (system.precision=fp32)"
    if gpu is not None:
        if want == "bf16" and not gpu.bf16:
            raise HardwareError(f"system.precision=bf16 was requested but {gpu.name} (compute capability "
                                f"{gpu.capability_str}) has no bf16 support; it needs compute capability >= 8.0",
                                "use `--set system.precision=fp16` (with a grad scaler) or `--set system.precision=auto`")
        if want == "fp16" and gpu.capability < (7, 0):
            return "fp16", (f"requested (system.precision=fp16); note: compute capability {gpu.capability_str} has no "
                            "tensor cores, fp16 may be slower than fp32")
        return want, f"requested (system.precision={want})"
    if device == "cpu":
        if want == "fp16":
            raise HardwareError("system.precision=fp16 is not supported on the CPU (no fp16 autocast with a grad scaler there)",
                                "use `--set system.precision=fp32` (or bf16, which works but is slow on CPU)")
        return "bf16", f"requested (system.precision=bf16); note: {CPU_BF16_REASON}"
    return want, f"requested (system.precision={want}) on Apple MPS"


def _resolve_attention(want: str, hw: Hardware, device: str, gpu: Optional[GPU], precision: str) -> tuple[str, str]:
    problem = None
    if hw.flash_attn is None:
        reason = hw.flash_attn_reason or "not installed"
        problem = "flash-attn is not installed" if reason == "not installed" else f"flash-attn is unavailable: {reason}"
    elif gpu is None:
        problem = f"flash-attn needs a CUDA GPU (device is {device})"
    elif gpu.capability < (8, 0):
        problem = f"flash-attn needs compute capability >= 8.0 ({gpu.name} has {gpu.capability_str})"
    elif precision not in ("bf16", "fp16"):
        problem = f"flash-attn needs bf16 or fp16 (precision is {precision})"
    if want == "auto":
        if problem is None:
            return "flash", f"auto: flash-attn {hw.flash_attn} on {gpu.name} in {precision}"  # type: ignore[union-attr]
        return "sdpa", f"auto: PyTorch SDPA ({problem})"
    if want == "flash":
        if problem is not None:
            installed = hw.flash_attn is not None
            hint = ("use `--set system.attention=sdpa` (PyTorch's fused attention)" if installed
                    else f"install it with {FLASH_INSTALL_HINT}, or use `--set system.attention=sdpa`")
            raise HardwareError(f"system.attention=flash was requested but {problem}", hint)
        return "flash", f"requested (system.attention=flash): flash-attn {hw.flash_attn}"
    if want == "eager":
        return "eager", "requested (system.attention=eager): reference implementation, slower and memory-hungry"
    return "sdpa", "requested (system.attention=sdpa)"


def _resolve_compile(want: str, device: str, gpu: Optional[GPU]) -> tuple[bool, str]:
    if want == "auto":
        if gpu is not None:
            if gpu.capability >= (7, 0):
                return True, f"auto: CUDA compute capability {gpu.capability_str} >= 7.0; fused Triton kernels pay off"
            return False, f"auto: Triton (torch.compile) needs compute capability >= 7.0 ({gpu.capability_str} here)"
        if device == "mps":
            return False, "auto: torch.compile on MPS is experimental; compile time outweighs gains"
        return False, "auto: compile time outweighs gains on short CPU runs"
    if want == "false":
        return False, "requested (system.compile=false)"
    if gpu is not None and gpu.capability < (7, 0):
        raise HardwareError(f"system.compile=true was requested but Triton, which torch.compile uses on CUDA, needs "
                            f"compute capability >= 7.0 ({gpu.name} has {gpu.capability_str})",
                            "use `--set system.compile=false`")
    note = "" if gpu is not None else "; note: compiling takes tens of seconds and needs a C++ compiler"
    return True, f"requested (system.compile=true){note}"


def resolve(system: config.SystemConfig, hw: Hardware) -> Runtime:
    """Turn the ``system`` config section into concrete choices for ``hw``.

    ``auto`` rules: device = CUDA GPU 0, else MPS, else CPU. Precision = bf16 on compute
    capability >= 8.0, fp16 with a grad scaler on 7.x, fp32 on older GPUs, MPS and CPU.
    Attention = flash when flash-attn imports, the device is CUDA >= 8.0 and precision is
    bf16/fp16; else PyTorch SDPA. Compile = on for CUDA >= 7.0, off on CPU and MPS.
    Explicit choices are honoured when they can work (bf16 on CPU is allowed, with a note).

    Raises:
        HardwareError: an explicit choice that cannot work here (cuda/mps without the device,
            bf16 on a GPU without bf16, fp16 on CPU, flash-attn unusable, compile on a GPU
            too old for Triton), naming why, with a hint such as ``--set system.device=cpu``.
    """
    device, r_dev, gpu = _resolve_device(system.device, hw)
    precision, r_prec = _resolve_precision(system.precision, device, gpu)
    attention, r_attn = _resolve_attention(system.attention, hw, device, gpu, precision)
    compile_, r_comp = _resolve_compile(system.compile, device, gpu)
    return Runtime(device=device, precision=precision, attention=attention, compile=compile_,
                   reasons={"device": r_dev, "precision": r_prec, "attention": r_attn, "compile": r_comp})


def resolve_distributed(cfg: "config.RunConfig", hw: Hardware, runtime: Runtime, world_size: int,
                        local_rank: int = 0) -> Runtime:
    """Add the multi-process choice to ``runtime``: which GPU this rank uses, and DDP or FSDP2.

    ``auto``: DDP when the model with its gradients, AdamW state and activations (the estimate
    behind ``--preset auto``) fits in :data:`MEMORY_FRACTION` of one device, else FSDP2, which
    shards weights, gradients and optimizer state over the ranks. One process is always ``none``.

    Raises:
        HardwareError: ``system.distributed=none`` with several processes, or more ranks on a node
            than it has GPUs.
    """
    want = cfg.system.distributed
    reasons = dict(runtime.reasons)
    device = runtime.device
    if world_size <= 1:
        reasons["distributed"] = "one process" + (" (system.distributed is ignored)" if want in ("ddp", "fsdp") else "")
        return dataclasses.replace(runtime, distributed="none", world_size=1, reasons=reasons)
    if want == "none":
        raise HardwareError(f"system.distributed=none, but torchrun started {world_size} processes",
                            "set `--set system.distributed=auto` (or ddp/fsdp), or run without torchrun")
    if runtime.device_type == "cuda":
        if local_rank >= len(hw.gpus):
            raise HardwareError(f"rank {local_rank} on this node has no GPU of its own ({len(hw.gpus)} visible)",
                                f"use at most `--nproc-per-node {len(hw.gpus)}`")
        device = f"cuda:{local_rank}"
        reasons["device"] = f"rank {local_rank} of this node: {_gpu_desc(hw.gpus[local_rank])}"
    if want in ("ddp", "fsdp"):
        reasons["distributed"] = f"requested (system.distributed={want}), {world_size} processes"
        return dataclasses.replace(runtime, device=device, distributed=want, world_size=world_size, reasons=reasons)
    act = 2 if runtime.precision in ("bf16", "fp16") else 4
    need = int(config.estimate_train_memory(cfg, bytes_per_activation=act, device_type=runtime.device_type,
                                            attention=runtime.attention)["total"])
    budget = int(MEMORY_FRACTION * device_memory_bytes(hw, runtime))
    if need <= budget:
        mode, why = "ddp", f"the model with its AdamW state (~{_gib(need)}) fits one device ({_gib(budget)} budget)"
    else:
        mode, why = "fsdp", (f"the model with its AdamW state (~{_gib(need)}) does not fit one device "
                             f"({_gib(budget)} budget): shard it over {world_size} processes")
    reasons["distributed"] = f"auto: {why}"
    return dataclasses.replace(runtime, device=device, distributed=mode, world_size=world_size, reasons=reasons)


def torchrun_command(n: int, args: str = "train --preset auto") -> str:
    """The command that trains on ``n`` local GPUs (what ``tfkit train --nproc-per-node`` runs)."""
    return f"torchrun --standalone --nproc-per-node {n} -m tfkit {args}"


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s (for MFU) and memory

# (regex on the GPU name, dense peak FLOP/s by precision). First match wins, so the more
# specific names come first. bf16/fp16: tensor cores with fp32 accumulation, dense (no 2:4
# sparsity). fp32: the TF32 tensor-core rate on compute capability >= 8.0, where tfkit trains fp32
# with TF32 matmuls (`torch.set_float32_matmul_precision("high")`), else plain FP32.
# Sources: NVIDIA datasheets (H100/H200/H800 SXM, PCIe and NVL; B200 HGX; A100; A10; L4; L40(S);
# the Ada and Ampere GeForce whitepapers for RTX 4090/3090); A10G (AWS) runs its tensor cores at
# about half the A10's rate.
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH100\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (r"\bH100\b", {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}),
    (r"\bG?H200\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    (r"\bG?H200\b", {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}),
    (r"\bH800\b.*\bPCIe\b", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (r"\bH800\b", {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}),
    (r"\bB200\b", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    (r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    (r"\bA10G\b", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    (r"\bL40S\b", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    (r"\bL40\b", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    (r"\bRTX 4090\b", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    (r"\bRTX 3090\b", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    (r"\bV100\b", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),
)


def peak_flops(hw: Hardware, runtime: Runtime) -> Optional[float]:
    """Dense peak FLOP/s of the runtime's GPU at its precision, for MFU; ``None`` when unknown.

    Looked up by GPU name in a table of dense datasheet figures: H100/H200/H800 in their SXM,
    PCIe and NVL forms (SXM bf16 989e12, PCIe 756e12, NVL 835e12), B200 2.25e15, A100 312e12,
    A10G, A10, L40S, L40, L4, RTX 4090/3090, V100 (fp16 125e12), T4. fp32 is the TF32 rate on
    compute capability >= 8.0 (e.g. A100 156e12), as tfkit trains fp32 there with TF32 matmuls.
    ``None`` on CPU, MPS, and GPUs not in the table.
    """
    idx = runtime.gpu_index
    if idx is None or idx >= len(hw.gpus):
        return None
    name = hw.gpus[idx].name
    for pattern, by_precision in _PEAK_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return by_precision.get(runtime.precision)
    return None


def device_memory_bytes(hw: Hardware, runtime: Runtime) -> int:
    """Memory available to training, in bytes: the GPU's total memory on CUDA; system RAM on CPU/MPS.

    Raises:
        HardwareError: the runtime names a CUDA device this machine does not have.
    """
    idx = runtime.gpu_index
    if idx is None:
        return hw.ram_bytes
    if idx >= len(hw.gpus):
        raise HardwareError(f"device {runtime.device} does not exist ({len(hw.gpus)} CUDA GPU(s) visible)",
                            "use `--set system.device=auto`")
    return hw.gpus[idx].memory_bytes


# ---------------------------------------------------------------------------------------------
# --preset auto


@dataclass(frozen=True)
class PresetChoice:
    """What ``--preset auto`` picks and why.

    Attributes:
        name: the chosen preset.
        estimate_bytes: its estimated training memory in bytes at the chosen micro-batch and
            checkpointing (:func:`tfkit.config.estimate_train_memory`).
        budget_bytes: the memory a preset may use: :data:`MEMORY_FRACTION` of the device's memory, in bytes.
        reason: one line saying why this preset, micro-batch and checkpointing.
        table: ``(preset, estimate_bytes, fits)`` for every preset, smallest first: the least memory
            each trains well in (a quarter of its micro-batch, grad checkpointing on), which grows
            with the preset.
        batch_size, grad_accum_steps, grad_checkpointing: the largest micro-batch that fits, with the
            accumulation that keeps the preset's tokens per step, and checkpointing only when no
            micro-batch fits without it; ``None`` on the CPU (the preset's own settings).
    """

    name: str
    estimate_bytes: int
    budget_bytes: int
    reason: str
    table: list[tuple[str, int, bool]]
    batch_size: Optional[int] = None
    grad_accum_steps: Optional[int] = None
    grad_checkpointing: Optional[bool] = None

    def overrides(self) -> dict[str, Any]:
        """The settings to apply on top of the preset, as dotted keys."""
        if self.batch_size is None:
            return {}
        return {"train.batch_size": self.batch_size, "train.grad_accum_steps": self.grad_accum_steps,
                "system.grad_checkpointing": self.grad_checkpointing}


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _least_batch(cfg: config.RunConfig) -> int:
    """The smallest micro-batch ``--preset auto`` trains a preset with: a quarter of its own."""
    return max(1, cfg.train.batch_size // 4)


def choose_preset(hw: Hardware, runtime: Runtime, vocab_size: int = 4096) -> PresetChoice:
    """Pick the largest preset that can train in 80% of the device's memory, then its micro-batch.

    A preset fits when its least memory (a quarter of its micro-batch, with grad checkpointing)
    fits; that figure grows with the preset. Then, on a GPU, the largest micro-batch dividing the preset's tokens per
    step (``batch_size * grad_accum_steps``) that fits without grad checkpointing is chosen, or, when
    none does, the largest that fits with it. Estimates use 2-byte activations under bf16/fp16 and
    4-byte under fp32, at ``vocab_size`` tokens, and count the CUDA context.

    On CPU the smallest preset (``nano``) is always chosen with its own settings: CPUs are
    compute-bound, so a larger model would not train meaningfully in minutes. On MPS and on GPUs
    without tensor cores (compute capability < 7.0) the choice is capped at ``tiny``.

    Raises:
        HardwareError: not even the smallest preset fits (or there are no presets).
    """
    names = config.list_presets()
    if not names:
        raise HardwareError("no presets found", "reinstall tfkit (`pip install --force-reinstall tfkit`)")
    mem = device_memory_bytes(hw, runtime)
    budget = int(MEMORY_FRACTION * mem)
    act = 2 if runtime.precision in ("bf16", "fp16") else 4

    def estimate(cfg: config.RunConfig, **kw: Any) -> int:
        return int(config.estimate_train_memory(cfg, bytes_per_activation=act, vocab_size=vocab_size,
                                                device_type=runtime.device_type, attention=runtime.attention,
                                                **kw)["total"])

    cfgs = {name: config.load(preset=name) for name in names}
    # the least memory a preset trains well in: a quarter of its micro-batch, with grad checkpointing
    table = [(name, estimate(cfgs[name], batch_size=_least_batch(cfgs[name]), grad_checkpointing=True), False)
             for name in names]
    table = [(name, est, est <= budget) for name, est, _ in table]
    where = "GPU memory" if runtime.device_type == "cuda" else "RAM"
    budget_text = f"{_gib(budget)} ({MEMORY_FRACTION:.0%} of {_gib(mem)} {where})"
    smallest = "nano" if "nano" in names else names[0]
    if runtime.device_type == "cpu":
        candidates = [smallest]
        why = "CPU: compute-bound, larger presets would not train meaningfully in minutes"
    elif runtime.device_type == "mps" and "tiny" in names:
        candidates = names[: names.index("tiny") + 1]
        why = "MPS: the largest preset that fits, capped at `tiny` (larger ones train too slowly on Apple GPUs)"
    elif runtime.gpu_index is not None and hw.gpus and hw.gpus[runtime.gpu_index].capability < (7, 0) \
            and "tiny" in names:
        candidates = names[: names.index("tiny") + 1]
        why = "no tensor cores: the largest preset that fits, capped at `tiny` (larger ones train too slowly)"
    else:
        candidates = names
        why = "the largest preset that fits"
    fitting = [row for row in table if row[0] in candidates and row[2]]
    if not fitting:
        est = dict((n, e) for n, e, _ in table)[candidates[0]]
        raise HardwareError(f"no preset fits: `{candidates[0]}` needs an estimated {_gib(est)} to train, "
                            f"more than the budget of {budget_text}",
                            "free memory, or choose `--preset nano` with a smaller `--set train.batch_size=...`")
    name = fitting[-1][0]
    cfg = cfgs[name]
    if runtime.device_type == "cpu":
        est = estimate(cfg)
        return PresetChoice(name=name, estimate_bytes=est, budget_bytes=budget, table=table,
                            reason=f"{why}; needs ~{_gib(est)} of a {budget_text} budget")
    per_step = cfg.train.batch_size * cfg.train.grad_accum_steps
    sizes = [b for b in range(per_step, 0, -1) if per_step % b == 0 and b >= _least_batch(cfg)]
    pick = next(((b, False) for b in sizes if estimate(cfg, batch_size=b, grad_checkpointing=False) <= budget), None)
    if pick is None:
        pick = next((b, True) for b in sizes if estimate(cfg, batch_size=b, grad_checkpointing=True) <= budget)
    b, ckpt = pick
    est = estimate(cfg, batch_size=b, grad_checkpointing=ckpt)
    reason = (f"{why}; micro-batch {b} x {per_step // b} accumulation, grad checkpointing "
              f"{'on (no micro-batch fits without it)' if ckpt else 'off'}; needs ~{_gib(est)} of a {budget_text} budget")
    return PresetChoice(name=name, estimate_bytes=est, budget_bytes=budget, reason=reason, table=table,
                        batch_size=b, grad_accum_steps=per_step // b, grad_checkpointing=ckpt)
