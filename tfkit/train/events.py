"""Events the training loop emits; the CLI renders them (dashboard or plain lines).

Every event is a plain dataclass with a ``kind``; :func:`to_record` gives the JSON-safe dict that
goes to ``metrics.jsonl``. Loss values are in nats per token; times in seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RunStarted:
    """The run is built and about to take its first (or resumed) step."""

    name: str
    run_dir: str
    arch: str
    params: int
    flops_per_token: float
    device: str
    precision: str
    attention: str
    compile: bool
    max_steps: int
    start_step: int
    max_time_s: Optional[float]
    tokens_per_step: int
    train_tokens: int
    val_tokens: int
    resumed: bool = False
    kind: str = "start"


@dataclass
class ScheduleFitted:
    """With ``train.max_time`` set: the number of steps the time budget allows, fixed once measured."""

    step: int
    schedule_steps: int
    seconds_per_step: float
    kind: str = "schedule"


@dataclass
class StepDone:
    """One optimizer step (emitted every ``train.log_interval`` steps and on the last)."""

    step: int
    max_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_seen: int
    tokens_per_s: float
    mfu: Optional[float]
    elapsed_s: float
    eta_s: Optional[float]
    memory_bytes: Optional[int]
    parts: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    kind: str = "step"


@dataclass
class EvalDone:
    """A validation pass: loss (nats/token), perplexity, bits per byte."""

    step: int
    loss: float
    perplexity: float
    bits_per_byte: Optional[float]
    tokens: int
    best: bool
    parts: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    kind: str = "eval"


@dataclass
class CheckpointSaved:
    step: int
    path: str
    seconds: float
    kind: str = "checkpoint"


@dataclass
class Message:
    """A note for the person watching (``level``: info | warning)."""

    text: str
    level: str = "info"
    kind: str = "message"


@dataclass
class RunFinished:
    """The loop ended: ``reason`` is max_steps | max_time | schedule_done | interrupted."""

    step: int
    reason: str
    elapsed_s: float
    tokens_seen: int
    val_loss: Optional[float]
    val_bits_per_byte: Optional[float]
    best_val_loss: Optional[float]
    kind: str = "end"


Event = Any


def to_record(event: Event) -> dict[str, Any]:
    """JSON-safe dict of an event (for ``metrics.jsonl``)."""
    return dataclasses.asdict(event)


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    mi, s = divmod(rem, 60)
    return f"{h}:{mi:02d}:{s:02d}" if h else f"{mi:d}:{s:02d}"


def format_event(event: Event) -> Optional[str]:
    """One plain-text line for an event (``train.log`` and non-terminal stderr); ``None`` to skip."""
    if isinstance(event, RunStarted):
        what = "resuming" if event.resumed else "training"
        return (f"{what} {event.name}: {event.arch}, {event.params / 1e6:.2f}M params on {event.device} "
                f"({event.precision}, attention {event.attention}, compile {'on' if event.compile else 'off'}), "
                f"{event.tokens_per_step:,} tokens/step, {event.train_tokens:,} train / {event.val_tokens:,} val tokens")
    if isinstance(event, ScheduleFitted):
        return (f"time budget fits ~{event.schedule_steps} steps at {event.seconds_per_step:.3f} s/step; "
                f"learning-rate schedule set to end there")
    if isinstance(event, StepDone):
        extra = "".join(f" {k} {v:.4g}" for k, v in {**event.parts, **event.stats}.items() if k != "ce")
        mfu = f" mfu {event.mfu * 100:.1f}%" if event.mfu is not None else ""
        return (f"step {event.step}/{event.max_steps} loss {event.loss:.4f} lr {event.lr:.2e} "
                f"grad_norm {event.grad_norm:.3f} {event.tokens_per_s:,.0f} tok/s{mfu} "
                f"elapsed {_fmt_time(event.elapsed_s)} eta {_fmt_time(event.eta_s)}{extra}")
    if isinstance(event, EvalDone):
        bpb = f" bpb {event.bits_per_byte:.4f}" if event.bits_per_byte is not None else ""
        return (f"eval step {event.step}: val loss {event.loss:.4f} ppl {event.perplexity:.2f}{bpb}"
                f"{' (best)' if event.best else ''}")
    if isinstance(event, CheckpointSaved):
        return f"checkpoint step {event.step} saved to {event.path} ({event.seconds:.1f}s)"
    if isinstance(event, Message):
        return f"{'warning: ' if event.level == 'warning' else ''}{event.text}"
    if isinstance(event, RunFinished):
        val = f", val loss {event.val_loss:.4f}" if event.val_loss is not None else ""
        return f"finished at step {event.step} ({event.reason}) after {_fmt_time(event.elapsed_s)}{val}"
    return None
