"""The root command: start-up cost, version, the error boundary and TFKIT_DEBUG."""

import subprocess
import sys

from typer.testing import CliRunner

from tfkit import __version__
from tfkit.cli.app import app

runner = CliRunner()


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, tfkit.cli.app; print(sorted(m for m in ('torch', 'numpy', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_and_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"tfkit {__version__}"
    for cmd in ("doctor", "tokenize", "prepare", "split", "dummy-data", "train", "resume", "eval", "generate",
                "list-models", "config"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0, (cmd, r.output)
        assert "Usage" in r.stdout


def test_error_boundary_and_debug_traceback(tmp_path):
    cmd = [sys.executable, "-m", "tfkit", "eval", "no-such-run"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 3
    assert r.stderr.splitlines()[0].startswith("error: no run named 'no-such-run'")
    assert r.stderr.splitlines()[1].startswith("hint: ")
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "TFKIT_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_hint_keeps_square_brackets(tmp_path):
    from tfkit.cli.app import report
    from tfkit.cli.output import err

    with err.capture() as cap:
        report("bad [thing]", "pip install 'tfkit[flash]'")
    assert "bad [thing]" in cap.get() and "pip install 'tfkit[flash]'" in cap.get()


def test_preset_auto_settings_yield_to_the_config_file_and_set_flags(tmp_path):
    from tfkit.cli.train import _keys_given

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  grad_accum_steps: 3\nsystem:\n  grad_checkpointing: true\n")
    given = _keys_given(cfg, ["train.batch_size=2", "optim.lr=1e-3"])
    assert {"train.batch_size", "train.grad_accum_steps", "system.grad_checkpointing"} <= given
    assert "train.max_steps" not in given and _keys_given(None, []) == set()
