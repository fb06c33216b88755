"""Fault injection for tests and ``benchmarks/fault_campaign.py``: crash or stall at named points.

Off unless the environment variable ``TFKIT_FAULT`` is set; then it holds comma-separated rules
``POINT[@STEP]=ACTION``:

- ``POINT``: a name passed to :func:`hit` (``save.begin``, ``save.files``, ``save.manifest``,
  ``save.swap``, ``best.files``, ``eval.batch``, ``step.end``).
- ``STEP``: fire only when the loop is at that optimizer step (default: every time); ``STEP#RANK``
  fires on that torchrun rank alone (``step.end@5#1=term``: SIGTERM to rank 1 at step 5).
- ``ACTION``: ``kill`` (SIGKILL this process), ``term`` / ``int`` (send SIGTERM / SIGINT to this
  process and carry on, as a scheduler or a Ctrl-C would), ``sleep:SECONDS``, or ``enospc``
  (raise ``OSError(ENOSPC)``, a full disk).

Example: ``TFKIT_FAULT='save.manifest@40=term'`` delivers SIGTERM while the step-40 checkpoint is
being written. This follows the "crash between any two writes" hooks of reliability testing in
shared/docs/reliability.md; the cost when unset is one dict lookup per point.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Optional

ENV = "TFKIT_FAULT"


def _parse(text: str, rank: int = 0) -> dict[str, list[tuple[Optional[int], str]]]:
    rules: dict[str, list[tuple[Optional[int], str]]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, _, action = item.partition("=")
        point, _, step = where.partition("@")
        step, _, only = step.partition("#")
        if only.strip() and int(only) != rank:
            continue
        rules.setdefault(point.strip(), []).append((int(step) if step.strip() else None, action.strip()))
    return rules


_RULES = _parse(os.environ.get(ENV, ""), int(os.environ.get("RANK", "0") or 0))


def hit(point: str, step: Optional[int] = None) -> None:
    """Carry out the ``TFKIT_FAULT`` rule for ``point`` at optimizer step ``step``, if any.

    Raises:
        OSError: ENOSPC, for the ``enospc`` action.
    """
    if not _RULES:
        return
    for at, action in _RULES.get(point, ()):
        if at is not None and at != step:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action in ("term", "int"):
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
