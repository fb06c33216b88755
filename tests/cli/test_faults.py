"""The real `tfkit` process under faults: SIGKILL, SIGTERM (143), Ctrl-C (130), a signal during the
final save, a full disk (RLIMIT_FSIZE), NaN weights, deliberate and accidental changes on resume."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tfkit.data.dummy import make_dummy

STEPS = 40
_SETS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context_length=16", "train.batch_size=4",
         "train.eval_interval=10", "train.eval_steps=2", "train.ckpt_interval=2", "train.log_interval=1",
         "optim.warmup_steps=5"]


def _train_args(data, name, steps=STEPS):
    args = ["train", "--train-data", str(data), "--name", name, "--max-steps", str(steps)]
    for s in _SETS:
        args += ["--set", s]
    return args


def _cmd(args):
    return [sys.executable, "-m", "tfkit", *args]


def _tfkit(args, fault="", home=None, **kw):
    env = {**os.environ, "TFKIT_FAULT": fault}
    if home is not None:
        env["TFKIT_HOME"] = str(home)
    return subprocess.run(_cmd(args), capture_output=True, text=True, env=env, timeout=300, **kw)


def _final(home, name, step=STEPS):
    return (Path(home) / "runs" / name / "checkpoints" / f"step-{step:08d}" / "model.safetensors").read_bytes()


def _info(home, name):
    return json.loads((Path(home) / "runs" / name / "run.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dummy.bin"
    make_dummy(path, 20_000, 100, seed=1)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The final weights of the uninterrupted run (bytes of its model.safetensors)."""
    home = tmp_path_factory.mktemp("ref_home")
    r = _tfkit(_train_args(data, "ref"), home=home)
    assert r.returncode == 0, r.stderr
    return _final(home, "ref")


def _start_slow(args, home):
    """A `tfkit train` whose steps each sleep 50 ms (TFKIT_FAULT), so a signal lands mid-run."""
    env = {**os.environ, "TFKIT_HOME": str(home), "TFKIT_FAULT": "step.end=sleep:0.05"}
    return subprocess.Popen(_cmd(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_mid_run_then_resume_is_bit_exact(data, reference, tfkit_home):
    proc = _start_slow(_train_args(data, "killed"), tfkit_home)
    _wait_for(tfkit_home / "runs/killed/checkpoints/step-00000010", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _info(tfkit_home, "killed")["status"] == "training"
    listed = json.loads(_tfkit(["list-models", "--json"]).stdout)
    assert [r["status"] for r in listed if r["name"] == "killed"] == ["stopped"]
    r = _tfkit(["resume", "killed"])
    assert r.returncode == 0, r.stderr
    assert _final(tfkit_home, "killed") == reference
    assert _info(tfkit_home, "killed")["status"] == "finished"


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_and_exits_with_its_code_then_resume_is_bit_exact(data, reference, tfkit_home, sig, code):
    proc = _start_slow(_train_args(data, "stopped"), tfkit_home)
    _wait_for(tfkit_home / "runs/stopped/checkpoints/step-00000006", proc)
    proc.send_signal(sig)
    _, err = proc.communicate()
    assert proc.returncode == code, err
    assert "continue with: tfkit resume stopped" in err and "Traceback" not in err
    info = _info(tfkit_home, "stopped")
    assert info["status"] == "interrupted"
    saved = json.loads((tfkit_home / "runs/stopped/checkpoints" / f"step-{info['step']:08d}/state.json").read_text())
    assert saved["step"] == info["step"] >= 6  # a checkpoint at the step it stopped
    r = _tfkit(["resume", "stopped"])
    assert r.returncode == 0, r.stderr
    assert _final(tfkit_home, "stopped") == reference


def test_sigterm_during_the_final_save_still_completes_the_run(data, reference, tfkit_home):
    r = _tfkit(_train_args(data, "late"), fault=f"save.files@{STEPS}=term")
    assert r.returncode == 0, r.stderr
    assert _info(tfkit_home, "late")["status"] == "finished"
    assert _final(tfkit_home, "late") == reference


def test_killed_before_the_first_checkpoint_resumes_from_step_zero(data, reference, tfkit_home):
    r = _tfkit(_train_args(data, "early"), fault="save.begin@2=kill")
    assert r.returncode == -signal.SIGKILL
    r = _tfkit(["resume", "early"])
    assert r.returncode == 0, r.stderr
    assert "no checkpoint yet" in r.stderr
    assert _final(tfkit_home, "early") == reference


def _limit(kind, limit):
    """A preexec_fn that sets the resource limit ``kind`` (RLIMIT_FSIZE, RLIMIT_AS) in the child."""
    def apply():
        resource.setrlimit(kind, (limit, limit))
    return apply


def test_a_full_disk_is_exit_3_and_the_run_continues_once_there_is_room(data, tfkit_home):
    assert _tfkit(_train_args(data, "full", steps=10)).returncode == 0
    # files may not grow past 64 KiB: the ~120 KB model.safetensors of the next checkpoint cannot be written
    r = _tfkit(["resume", "full", "--max-steps", "20"], preexec_fn=_limit(resource.RLIMIT_FSIZE, 64 * 1024))
    assert r.returncode == 3, r.stderr
    first = next(line for line in r.stderr.splitlines() if line.startswith("error:"))
    assert first.startswith("error: cannot write checkpoint `") and "step-00000012`: File too large (" in first
    assert "MiB free there)" in first and "Traceback" not in r.stderr
    info = _info(tfkit_home, "full")
    assert info["status"] == "failed" and "File too large" in info["error"]
    ckpts = sorted(p.name for p in (tfkit_home / "runs/full/checkpoints").iterdir())
    assert ckpts == ["best", "step-00000008", "step-00000010"]
    r = _tfkit(["resume", "full", "--max-steps", "20"])
    assert r.returncode == 0, r.stderr
    assert _info(tfkit_home, "full")["step"] == 20


def test_eval_refuses_weights_holding_nan(data, tfkit_home):
    import torch
    from safetensors.torch import load_file, save_file

    from tfkit.train import checkpoint as ck

    assert _tfkit(_train_args(data, "nan", steps=4)).returncode == 0
    path = tfkit_home / "runs/nan/checkpoints/step-00000004"
    tensors = load_file(str(path / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))
    manifest = json.loads((path / "manifest.json").read_text())  # a consistent manifest: not a corrupt file
    manifest["files"]["model.safetensors"] = {"sha256": ck._sha256(path / "model.safetensors"),
                                              "bytes": (path / "model.safetensors").stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert torch.isnan(load_file(str(path / "model.safetensors"))[name]).any()
    r = _tfkit(["eval", "nan", "--json"])
    assert r.returncode == 3 and r.stdout == ""
    assert f"weight `{name}` holds NaN or Inf" in r.stderr and "Traceback" not in r.stderr


def test_resume_records_deliberate_changes_and_refuses_accidental_ones(data, tfkit_home):
    assert _tfkit(_train_args(data, "chg", steps=6)).returncode == 0
    r = _tfkit(["resume", "chg", "--max-steps", "8", "--set", "optim.lr=5e-4"])
    assert r.returncode == 0, r.stderr
    assert "changing on purpose: optim.lr 0.001 -> 0.0005" in r.stderr
    cfg_path = tfkit_home / "runs/chg/config.yaml"
    assert yaml.safe_load(cfg_path.read_text())["optim"]["lr"] == 0.0005
    history = _info(tfkit_home, "chg")["history"]
    assert [h["event"] for h in history] == ["train", "resume"]
    assert history[1]["changes"] == {"optim.lr": [0.001, 0.0005]} and "--set optim.lr=5e-4" in history[1]["command"]
    sessions = json.loads((tfkit_home / "runs/chg/env.json").read_text())["sessions"]
    assert [s["event"] for s in sessions] == ["train", "resume"] and sessions[1]["from_step"] == 6

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"]["batch_size"] = 8
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = _tfkit(["resume", "chg", "--max-steps", "10"])
    assert r.returncode == 2
    assert "error: run `chg` changed since checkpoint step 8: train.batch_size 4 -> 8" in r.stderr
    r = _tfkit(["resume", "chg", "--max-steps", "10", "--allow-changes"])
    assert r.returncode == 0, r.stderr
    assert "continuing despite changes (--allow-changes): train.batch_size 4 -> 8" in r.stderr


def test_running_out_of_host_memory_is_exit_1_with_advice(data, tfkit_home):
    assert _tfkit(_train_args(data, "oom", steps=4)).returncode == 0
    # 65,536 sequences of 16 tokens: the first activations alone need more than the 3 GiB allowed
    r = _tfkit(["resume", "oom", "--max-steps", "8", "--set", "train.batch_size=65536"],
               preexec_fn=_limit(resource.RLIMIT_AS, 3 << 30))
    assert r.returncode == 1, r.stderr
    error = next(line for line in r.stderr.splitlines() if line.startswith("error:"))
    assert error.startswith("error: out of memory on cpu at step 5 (micro-batch 65536 x 16 tokens")
    assert "--set train.batch_size=32768 --set train.grad_accum_steps=2" in r.stderr and "Traceback" not in r.stderr
    assert _info(tfkit_home, "oom")["status"] == "failed"
    cfg = yaml.safe_load((tfkit_home / "runs/oom/config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 4  # the failed session's --set did not stick
    assert sorted(p.name for p in (tfkit_home / "runs/oom/checkpoints").iterdir()) == ["best", "step-00000002",
                                                                                   "step-00000004"]
