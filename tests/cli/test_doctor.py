"""`tfkit doctor`: the real command, on this machine and on faked ones (TFKIT_FAKE_HARDWARE)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tfkit import config, hardware
from tfkit.cli import doctor
from tfkit.cli.app import app


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path):
    monkeypatch.setenv("TFKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(hardware.FAKE_ENV, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


def run(*args: str):
    return CliRunner().invoke(app, ["doctor", *args], prog_name="tfkit")


def run_json(*args: str):
    result = run("--json", *args)
    return result, json.loads(result.stdout)


def fake_file(tmp_path, **fields) -> str:
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(fields))
    return str(path)


def test_json_on_this_machine():
    result, data = run_json()
    assert result.exit_code == 0, result.stderr
    assert set(data) == {"ok", "checks", "hardware", "auto"} and data["ok"] is True
    assert result.stderr == ""  # --json: nothing for humans
    names = [c["name"] for c in data["checks"]]
    for name in ("python", "torch", "CUDA / cuDNN", "tokenizers", "flash-attn", "CPU", "MPS", "disk",
                 "auto: preset", "auto: precision", "auto: attention", "auto: compile"):
        assert name in names
    assert all(set(c) >= {"name", "status", "detail"} and c["status"] in ("ok", "warn") for c in data["checks"])
    auto = data["auto"]
    assert set(auto) >= {"preset", "precision", "attention", "compile", "device", "reasons", "memory_estimate_bytes"}
    assert set(auto["reasons"]) >= {"preset", "device", "precision", "attention", "compile"}
    assert auto["preset"] in config.list_presets() and auto["memory_estimate_bytes"] > 0
    hw = data["hardware"]
    assert hw["cpu_cores"] >= 1 and hw["ram_bytes"] > 0 and hw["torch_version"]
    if not hw["gpus"] and not hw["mps"]:
        assert (auto["device"], auto["preset"], auto["precision"], auto["compile"]) == ("cpu", "nano", "fp32", False)
        assert "5x slower" in auto["reasons"]["precision"]


def test_human_table_goes_to_stderr_only():
    result = run()
    assert result.exit_code == 0
    assert result.stdout == ""
    err = result.stderr
    for text in ("tfkit doctor", "python", "torch", "tokenizers", "flash-attn", "disk", "auto: preset",
                 "auto: attention", "ok", "training can run here"):
        assert text in err
    assert "FAIL" not in err


@pytest.mark.parametrize("profile, preset, precision, compile_, device", [
    ("h100", "large", "bf16", True, "cuda"),
    ("v100", "medium", "fp16", True, "cuda"),
    ("gtx1080", "tiny", "fp32", False, "cuda"),  # no tensor cores: capped at tiny
    ("mps", "tiny", "fp32", False, "mps"),
    ("cpu", "nano", "fp32", False, "cpu"),
])
def test_auto_choice_on_fake_machines(monkeypatch, profile, preset, precision, compile_, device):
    monkeypatch.setenv(hardware.FAKE_ENV, profile)
    result, data = run_json()
    assert result.exit_code == 0
    auto = data["auto"]
    assert (auto["preset"], auto["precision"], auto["compile"], auto["device"]) == (preset, precision, compile_, device)
    assert auto["attention"] == "sdpa"
    assert auto["memory_estimate_bytes"] <= auto["memory_budget_bytes"]
    gpus = data["hardware"]["gpus"]
    assert len(gpus) == (1 if device == "cuda" else 0)
    gpu_rows = [c for c in data["checks"] if c["name"] == "GPU 0"]
    if gpus:
        assert gpu_rows[0]["detail"].startswith(gpus[0]["name"])
        assert "compute capability" in gpu_rows[0]["detail"] and "bf16: " in gpu_rows[0]["detail"]
        assert gpu_rows[0]["status"] == ("warn" if profile == "gtx1080" else "ok")


def test_h100_without_flash_attn_suggests_installing_it(monkeypatch):
    monkeypatch.setenv(hardware.FAKE_ENV, "h100")
    result = run()
    assert result.exit_code == 0
    assert "warn" in result.stderr and "tfkit[flash]" in result.stderr


@pytest.mark.parametrize("fields, what, hint", [
    ({"torch_version": None}, "torch", "pip install torch"),
    ({"tokenizers_version": None}, "tokenizers", "pip install tokenizers"),
    ({"python_version": "3.9.18"}, "python", "Python 3.10 or newer"),
])
def test_broken_requirement_exits_1_with_hint(monkeypatch, tmp_path, fields, what, hint):
    monkeypatch.setenv(hardware.FAKE_ENV, fake_file(tmp_path, **fields))
    result = run()
    assert result.exit_code == 1
    assert "FAIL" in result.stderr
    assert "error:" in result.stderr and f"({what})" in result.stderr
    assert "hint:" in result.stderr and hint in result.stderr
    assert "Traceback" not in result.stderr
    result, data = run_json()
    assert result.exit_code == 1 and data["ok"] is False
    failed = [c for c in data["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == [what] and hint in failed[0]["hint"]


def test_data_dir_that_is_a_file_fails(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("TFKIT_HOME", str(blocker / "tfkit"))
    result = run()
    assert result.exit_code == 1
    assert "is a file" in result.stderr and "TFKIT_HOME" in result.stderr


def test_unwritable_data_dir_fails(monkeypatch):
    monkeypatch.setattr(doctor, "_writable", lambda path: False)
    result, data = run_json()
    assert result.exit_code == 1
    disk = next(c for c in data["checks"] if c["name"] == "disk")
    assert disk["status"] == "fail" and "not writable" in disk["detail"]
    assert "hint:" in result.stderr and "TFKIT_HOME" in result.stderr


def test_monkeypatched_failing_check_exits_1(monkeypatch):
    monkeypatch.setattr(doctor, "check_tokenizers",
                        lambda hw: doctor.Check("tokenizers", "fail", "broken install", "run `pip install -U tokenizers`"))
    result = run()
    assert result.exit_code == 1
    assert "broken install" in result.stderr and "hint: run `pip install -U tokenizers`" in result.stderr


def test_low_disk_is_a_warning_not_a_failure(monkeypatch):
    monkeypatch.setattr(doctor, "LOW_DISK_BYTES", 10**30)
    result = run()
    assert result.exit_code == 0
    assert "below 5 GB" in result.stderr and "hint (disk)" in result.stderr


def test_help_explains_with_an_example():
    result = CliRunner().invoke(app, ["doctor", "--help"], prog_name="tfkit")
    assert result.exit_code == 0
    assert "--json" in result.stdout and "Example" in result.stdout and "--preset auto" in result.stdout


def test_several_gpus_get_a_distributed_choice_and_the_torchrun_command(tmp_path, monkeypatch):
    gpu = {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * 1024**3, "capability": [9, 0]}
    monkeypatch.setenv(hardware.FAKE_ENV, fake_file(tmp_path, cuda_version="12.4", gpus=[gpu] * 4))
    result, data = run_json()
    assert result.exit_code == 0, result.stderr
    auto = data["auto"]
    assert (auto["distributed"], auto["world_size"]) == ("ddp", 4)
    assert auto["torchrun_command"] == "torchrun --standalone --nproc-per-node 4 -m tfkit train --preset auto"
    row = next(c for c in data["checks"] if c["name"] == "auto: distributed")
    assert "ddp over 4 GPUs" in row["detail"] and "--nproc-per-node 4" in row["detail"]
    monkeypatch.setenv(hardware.FAKE_ENV, "cpu")
    _, data = run_json()
    assert data["auto"]["distributed"] == "none" and data["auto"]["torchrun_command"] is None
