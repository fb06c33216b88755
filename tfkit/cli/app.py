"""The `tfkit` command: the root Typer app and the one place errors become `error:`/`hint:` lines.

Each subcommand lives in its own small module under ``tfkit.cli`` and is registered below.
Library code raises :class:`tfkit.errors.TfkitError`; :class:`_ErrorBoundary` prints it as two
lines on stderr and exits with the error's code. ``TFKIT_DEBUG=1`` re-raises with the traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from tfkit import __version__
from tfkit.errors import TfkitError


def _debug() -> bool:
    return os.environ.get("TFKIT_DEBUG", "") not in ("", "0", "false")


def report(message: str, hint: str = "") -> None:
    """Print ``error: message`` and ``hint: hint`` on stderr."""
    from rich.markup import escape

    from tfkit.cli.output import err, process_rank

    rank = process_rank()
    where = escape(f"[rank {rank}] ") if rank else ""  # under torchrun, say which process failed
    err.print(f"{where}[bold red]error:[/bold red] {escape(message)}", highlight=False)
    if hint:
        err.print(f"[bold]hint:[/bold] {escape(hint)}", highlight=False)


def _echo_of_rank_zero(exc: TfkitError) -> bool:
    """True for rank 0's error as another rank of the same machine heard it: rank 0 has printed it
    to the same terminal already (ranks on other machines, ``GROUP_RANK`` > 0, still print it)."""
    from tfkit.train.distributed import RankZeroFailed

    return isinstance(exc, RankZeroFailed) and os.environ.get("GROUP_RANK", "0") == "0"


class _ErrorBoundary(TyperGroup):
    """Root group that turns tfkit errors (and OS errors) into one-line messages and exit codes."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except BrokenPipeError:  # `tfkit ... | head`: the reader left; end quietly
            sys.stderr = open(os.devnull, "w")
            raise typer.Exit(0) from None
        except TfkitError as exc:
            if _debug():
                raise
            if not _echo_of_rank_zero(exc):
                report(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            report("interrupted", "a run can be continued with `tfkit resume RUN`")
            raise typer.Exit(130) from None
        except OSError as exc:
            if _debug():
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            report(f"{exc.strerror or exc}{where}", "check the path, its permissions and the free disk space")
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: say so briefly, keep the traceback for TFKIT_DEBUG=1
            if _debug():
                raise
            report(f"internal error: {type(exc).__name__}: {exc}",
                   "rerun with `TFKIT_DEBUG=1` to see the traceback, and report it")
            raise typer.Exit(1) from None


app = typer.Typer(
    name="tfkit",
    cls=_ErrorBoundary,
    help="Train transformer language models from raw text, and generate text with them.\n\n"
    "Start with `tfkit train --preset auto` (trains on bundled Shakespeare), then `tfkit generate RUN`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tfkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train transformer language models from raw text, and generate text with them."""


def _register() -> None:
    from tfkit.cli import chat, config_cmd, doctor, dummy, eval as eval_cmd, export, generate, import_cmd, list_models
    from tfkit.cli import prepare, resume, split, tokenize, train

    app.command("doctor")(doctor.command)
    app.command("tokenize")(tokenize.command)
    app.command("prepare")(prepare.command)
    app.command("split")(split.command)
    app.command("dummy-data")(dummy.command)
    app.add_typer(config_cmd.app, name="config")
    app.command("train")(train.command)
    app.command("resume")(resume.command)
    app.command("eval")(eval_cmd.command)
    app.command("generate")(generate.command)
    app.command("chat")(chat.command)
    app.command("list-models")(list_models.command)
    app.command("import")(import_cmd.command)
    app.command("export")(export.command)


_register()


def main() -> None:
    """Console-script entry point (`tfkit`).

    A rank of a distributed run leaves through ``os._exit`` once its output is flushed: by then it
    has left the process group and closed its files, and skipping the interpreter's teardown skips
    C++ destructors of gloo/inductor threads that, in the wrong order, abort a finished run (seen
    once in CI as ``terminate called without an active exception`` and SIGABRT after rank 0 had
    saved the last checkpoint)."""
    from tfkit.cli.output import process_world_size

    if process_world_size() <= 1:
        app(prog_name="tfkit")
        return
    try:
        app(prog_name="tfkit")
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
    sys.exit(0)
