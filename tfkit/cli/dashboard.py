"""The live training dashboard (Rich) and its plain-line fallback for logs and CI.

On a terminal: a panel redrawn a few times a second with step/max, loss and a loss sparkline,
val loss, learning rate, grad norm, tokens/s, MFU, elapsed, ETA and device memory. Otherwise
(stderr redirected, ``TERM=dumb``): one plain line per event, as in ``train.log``.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tfkit.cli.output import err, human_bytes, human_count, stderr_is_terminal
from tfkit.train.events import (EvalDone, Message, RunFinished, RunStarted, StepDone, _fmt_time, format_event)

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 48) -> str:
    """Unicode block sparkline of the last ``width`` values (low = ▁, high = █)."""
    vals = list(values)[-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(_BLOCKS[min(len(_BLOCKS) - 1, int((v - lo) / span * (len(_BLOCKS) - 1) + 0.5))] for v in vals)


class Dashboard:
    """Callable event sink: ``loop.run(job, on_event=Dashboard())``; use as a context manager."""

    def __init__(self, live: Optional[bool] = None) -> None:
        self.live_mode = stderr_is_terminal() if live is None else live
        self.start: Optional[RunStarted] = None
        self.step: Optional[StepDone] = None
        self.eval: Optional[EvalDone] = None
        self.losses: deque[float] = deque(maxlen=240)
        self.messages: deque[str] = deque(maxlen=3)
        self._live: Optional[Live] = None

    def __enter__(self) -> "Dashboard":
        if self.live_mode:
            self._live = Live(self._render(), console=err, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def __call__(self, event) -> None:
        if isinstance(event, RunStarted):
            self.start = event
        elif isinstance(event, StepDone):
            self.step = event
            self.losses.append(event.loss)
        elif isinstance(event, EvalDone):
            self.eval = event
        if self._live is None:
            line = format_event(event)
            if line and not isinstance(event, RunFinished):
                err.print(line, markup=False, highlight=False)
            return
        if isinstance(event, Message):
            self.messages.append(format_event(event) or "")
        self._live.update(self._render())

    def _render(self) -> Panel:
        s, st, ev = self.start, self.step, self.eval
        title = f"tfkit train · {s.name}" if s else "tfkit train"
        if s is None:
            return Panel(Text("starting…"), title=title)
        table = Table.grid(padding=(0, 2))
        for _ in range(4):
            table.add_column()
        dash = "-"
        if st:
            bar = ProgressBar(total=max(1, st.max_steps), completed=st.step, width=30)
            table.add_row("step", f"{st.step:,}/{st.max_steps:,}", "progress", bar)
            table.add_row("loss", f"{st.loss:.4f}", "val loss",
                          f"{ev.loss:.4f} (bpb {ev.bits_per_byte:.3f})" if ev and ev.bits_per_byte is not None
                          else (f"{ev.loss:.4f}" if ev else dash))
            table.add_row("lr", f"{st.lr:.2e}", "grad norm", f"{st.grad_norm:.3f}")
            table.add_row("tokens/s", f"{st.tokens_per_s:,.0f}", "MFU", f"{st.mfu * 100:.1f}%" if st.mfu is not None else "n/a")
            table.add_row("elapsed", _fmt_time(st.elapsed_s), "ETA", _fmt_time(st.eta_s))
            table.add_row("tokens", human_count(st.tokens_seen), "memory",
                          human_bytes(st.memory_bytes) if st.memory_bytes else dash)
            for k, v in {**st.parts, **st.stats}.items():
                if k != "ce":
                    table.add_row(k, f"{v:.4g}", "", "")
        else:
            table.add_row("step", f"{s.start_step}", "", "compiling / first step…")
        head = Text(f"{s.arch} · {s.params / 1e6:.2f}M params · {s.device} {s.precision} · attention {s.attention}"
                    f" · {s.tokens_per_step:,} tokens/step")
        parts = [head, table]
        if self.losses:
            parts.append(Text(f"loss {sparkline(list(self.losses))}"))
        parts += [Text(m) for m in self.messages]
        return Panel(Group(*parts), title=title, border_style="cyan")
