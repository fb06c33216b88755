"""Typed errors raised by library code; the CLI turns them into `error:`/`hint:` lines.

Every error carries a one-line ``message`` (naming the file, field or value at fault) and a
``hint`` (the next thing to type). ``exit_code`` follows the contract in
``shared/docs/reliability.md``: 2 bad input, 3 checkpoint integrity failure, 1 otherwise.
"""

from __future__ import annotations


class TfkitError(Exception):
    """Base class of every error tfkit reports to a user.

    Args:
        message: one line saying what is wrong, naming the file, field or value.
        hint: one line saying what to do next (a command in backticks where there is one).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(TfkitError):
    """A config file, preset or `--set` override is malformed or out of range (exit 2)."""

    exit_code = 2


class DataError(TfkitError):
    """An input text, token file or tokenizer is missing, empty or inconsistent (exit 2)."""

    exit_code = 2


class CheckpointError(TfkitError):
    """A run or checkpoint is missing, incomplete or corrupt (exit 3)."""

    exit_code = 3


class HardwareError(TfkitError):
    """The requested device, precision or backend is not available here (exit 1)."""

    exit_code = 1


class ResourceError(TfkitError):
    """The machine ran out of a resource it needs, such as memory (exit 1)."""

    exit_code = 1
