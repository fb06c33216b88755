"""The run folder: finding runs, the lock, status of a killed run, history and env.json."""

import json
import subprocess
import sys

import pytest

from tfkit.errors import CheckpointError
from tfkit.train import runs


def test_unknown_run_suggests_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TFKIT_HOME", str(tmp_path))
    (tmp_path / "runs" / "shakespeare").mkdir(parents=True)
    (tmp_path / "runs" / "shakespeare" / "run.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no run named 'shakespear'") as exc:
        runs.resolve_run("shakespear")
    assert "`shakespeare`" in exc.value.hint


def test_run_lock_refuses_a_second_holder(tmp_path):
    with runs.run_lock(tmp_path):
        code = ("import sys; from pathlib import Path; from tfkit.train.runs import run_lock\n"
                "from tfkit.errors import CheckpointError\n"
                "try:\n    run_lock(Path(sys.argv[1])).__enter__()\nexcept CheckpointError as e:\n    print(e); sys.exit(2)")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 2 and "locked by pid" in r.stdout
        assert runs.lock_is_held(tmp_path)
        assert runs.shown_status(tmp_path, {"status": "training"}) == "training"


def test_a_killed_run_shows_as_stopped(tmp_path):
    code = "import os, sys; from pathlib import Path; from tfkit.train.runs import run_lock\n" \
           "with run_lock(Path(sys.argv[1])): os._exit(9)"  # dies holding the lock, as under SIGKILL
    subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert (tmp_path / ".lock").read_text().startswith("pid ")
    assert not runs.lock_is_held(tmp_path)
    assert runs.shown_status(tmp_path, {"status": "training"}) == "stopped"
    assert runs.shown_status(tmp_path, {"status": "finished"}) == "finished"


def test_history_and_sessions_append(tmp_path):
    runs.write_json_atomic(tmp_path / "run.json", {"name": "r", "history": [{"event": "train"}]})
    runs.append_history(tmp_path, {"event": "resume", "changes": {"optim.lr": [0.001, 0.0003]}})
    history = runs.read_run_info(tmp_path)["history"]
    assert [h["event"] for h in history] == ["train", "resume"] and history[1]["changes"]["optim.lr"] == [0.001, 0.0003]
    assert "command" in history[1] and "time" in history[1]
    runs.record_session(tmp_path, {**runs.environment(), "event": "train"})
    runs.record_session(tmp_path, {"event": "resume"})
    sessions = json.loads((tmp_path / "env.json").read_text())["sessions"]
    assert [s["event"] for s in sessions] == ["train", "resume"]
    env = sessions[0]
    for key in ("python", "torch", "cuda", "cudnn", "tokenizers", "numpy", "safetensors", "device_name", "command"):
        assert key in env
    import numpy
    import torch

    assert env["torch"] == torch.__version__ and env["numpy"] == numpy.__version__ and env["device_name"]


def test_try_update_run_info_never_raises(tmp_path):
    missing = tmp_path / "gone"
    assert runs.try_update_run_info(missing, status="failed") is False
    assert runs.try_update_run_info(tmp_path, status="failed") is True
    assert runs.read_run_info(tmp_path)["status"] == "failed"
