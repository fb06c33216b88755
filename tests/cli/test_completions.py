"""Shell completion: the committed scripts are up to date, Typer offers install/show, completions work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tfkit import config
from tfkit.cli import options
from tfkit.cli.app import app

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_completions", ROOT / "tools" / "gen_completions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.mark.parametrize("shell", gen.SHELLS)
def test_committed_script_matches_generated(shell):
    path = ROOT / "completions" / f"tfkit.{shell}"
    assert path.is_file(), "run `python tools/gen_completions.py`"
    assert path.read_text(encoding="utf-8") == gen.render(shell), "run `python tools/gen_completions.py`"
    assert "_TFKIT_COMPLETE" in path.read_text(encoding="utf-8")


def test_check_mode(monkeypatch, tmp_path, capsys):
    assert gen.main(["--check"]) == 0
    monkeypatch.setattr(gen, "OUT_DIR", tmp_path)
    assert gen.main(["--check"]) == 1  # missing files
    assert "out of date" in capsys.readouterr().err
    assert gen.main([]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tfkit.bash", "tfkit.fish", "tfkit.zsh"]
    assert gen.main(["--check"]) == 0
    (tmp_path / "tfkit.zsh").write_text("#compdef tfkit\n# edited by hand\n")
    assert gen.main(["--check"]) == 1


def test_zsh_script_starts_with_compdef():
    assert gen.render("zsh").startswith("#compdef tfkit\n")


def test_help_offers_install_and_show_completion():
    result = CliRunner().invoke(app, ["--help"], prog_name="tfkit")
    assert result.exit_code == 0
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


@pytest.mark.parametrize("shell", gen.SHELLS)
def test_show_completion_prints_the_committed_script(monkeypatch, shell):
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")  # take the shell as an argument
    result = CliRunner().invoke(app, ["--show-completion", shell], prog_name="tfkit")
    assert result.exit_code == 0
    assert result.stdout.strip() == gen.script(shell)
    committed = (ROOT / "completions" / f"tfkit.{shell}").read_text(encoding="utf-8")
    assert all(line in committed.splitlines() for line in gen.script(shell).splitlines())


def complete_bash(words: str, monkeypatch) -> list[str]:
    """What the bash script gets back from `tfkit` for the command line `words` (cursor at the end)."""
    parts = words.split(" ")
    env = {"_TFKIT_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)}
    result = CliRunner().invoke(app, [], env=env, prog_name="tfkit")
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def test_bash_completes_commands_and_presets(monkeypatch):
    assert "doctor" in complete_bash("tfkit doc", monkeypatch)
    assert complete_bash("tfkit train --preset t", monkeypatch) == ["tiny"]


def test_option_completion_callbacks(monkeypatch, tmp_path):
    assert options.complete_presets("") == [*config.list_presets(), "auto"]
    assert "nano" in options.complete_presets("n")
    assert options.complete_presets("a") == ["auto"]
    assert "optim.lr=" in options.complete_set_keys("optim.l")
    assert "optim=" not in options.complete_set_keys("")
    assert options.complete_set_keys("optim.lr=3") == []
    monkeypatch.setenv("TFKIT_HOME", str(tmp_path))
    assert options.complete_runs("") == []  # no runs dir yet
    for name in ("shakespeare-1", "shakespeare-2", "other"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / "stray.txt").write_text("not a run")
    assert options.complete_runs("sh") == ["shakespeare-1", "shakespeare-2"]
    assert options.complete_runs("") == ["other", "shakespeare-1", "shakespeare-2"]
