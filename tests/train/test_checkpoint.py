"""Checkpoints: atomic layout, strict manifests, recovery after a crash at any write, write order
as `latest`, the best weights, a full disk, strict keys, no pickle."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tfkit.errors import CheckpointError
from tfkit.train import checkpoint as ck
from tfkit.train import faults


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 10, bias=False)
        self.proj.weight = self.embed.weight  # tied, as in the models


def _save(run_dir, step, seed=0):
    torch.manual_seed(seed)
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.proj(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    return model, opt, ck.save_checkpoint(run_dir, model, opt, ck.TrainState(step=step, tokens_seen=step * 10),
                                          meta={"config": {"optim": {"lr": 1e-3}}})


def _steps(run_dir):
    return [s for s, _ in ck.list_checkpoints(run_dir)]


def test_layout_manifest_and_round_trip(tmp_path):
    model, opt, path = _save(tmp_path, 5)
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "optimizer.safetensors",
                                                      "rng.safetensors", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "full" and manifest["step"] == 5 and manifest["seq"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    assert ck.load_state(path)["config"] == {"optim": {"lr": 1e-3}}  # what produced it, for `resume` to check
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    fresh = _Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = ck.load_training_state(path, fresh, fresh_opt)
    assert state.step == 5 and state.tokens_seen == 50
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.proj.weight.data_ptr() == fresh.embed.weight.data_ptr()  # still tied after loading
    a, b = opt.state_dict()["state"][0], fresh_opt.state_dict()["state"][0]
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert float(a["step"]) == float(b["step"]) == 1.0


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_opt", "no_manifest"])
def test_latest_falls_back_past_a_corrupt_checkpoint(tmp_path, damage):
    _save(tmp_path, 1)
    _, _, newest = _save(tmp_path, 2, seed=1)
    target = newest / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "delete_opt":
        (newest / "optimizer.safetensors").unlink()
    else:
        (newest / "manifest.json").unlink()
    warnings = []
    assert ck.find_checkpoint(tmp_path, "latest", on_warning=warnings.append).name == "step-00000001"
    if damage != "no_manifest":  # without its manifest the folder does not count as a checkpoint at all
        assert len(warnings) == 1 and "step 2" in warnings[0]
        with pytest.raises(CheckpointError, match=r"step-00000002"):
            ck.find_checkpoint(tmp_path, "2")


def _tamper(manifest: dict, case: str) -> object:
    files = manifest["files"]
    if case == "empty_files":
        manifest["files"] = {}
    elif case == "no_bytes":
        del files["model.safetensors"]["bytes"]
    elif case == "bytes_text":
        files["model.safetensors"]["bytes"] = str(files["model.safetensors"]["bytes"])
    elif case == "bad_sha":
        files["state.json"]["sha256"] = "xyz"
    elif case == "entry_not_object":
        files["rng.safetensors"] = 7
    elif case == "partial":
        del files["optimizer.safetensors"]
    elif case == "extra_file":
        files["../../escape"] = dict(files["state.json"])
    elif case == "no_files":
        del manifest["files"]
    elif case == "unknown_kind":
        manifest["kind"] = "sharded"
    elif case == "wrong_step":
        manifest["step"] = 1
    elif case == "step_text":
        manifest["step"] = "2"
    elif case == "list":
        return [manifest]
    elif case == "not_json":
        return None
    return manifest


TAMPER = ["empty_files", "no_bytes", "bytes_text", "bad_sha", "entry_not_object", "partial", "extra_file", "no_files",
          "unknown_kind", "wrong_step", "step_text", "list", "not_json"]


@pytest.mark.parametrize("case", TAMPER)
def test_every_malformed_manifest_is_a_checkpoint_error_and_latest_falls_back(tmp_path, case):
    _save(tmp_path, 1)
    _, _, newest = _save(tmp_path, 2, seed=1)
    mpath = newest / "manifest.json"
    tampered = _tamper(json.loads(mpath.read_text()), case)
    mpath.write_text("{not json" if tampered is None else json.dumps(tampered))
    with pytest.raises(CheckpointError) as exc:
        ck.verify_checkpoint(newest)
    assert "manifest.json" in exc.value.message and exc.value.exit_code == 3
    warnings = []
    assert ck.find_checkpoint(tmp_path, "latest", on_warning=warnings.append).name == "step-00000001"
    assert len(warnings) == 1 and "step 2" in warnings[0]


def test_strict_keys_and_shapes(tmp_path):
    _, _, path = _save(tmp_path, 3)
    other = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="missing keys|unexpected keys"):
        ck.load_weights(other, path)


def test_latest_is_the_last_written_and_pruning_keeps_the_newest(tmp_path):
    for s in (10, 20, 30):
        _save(tmp_path, s)
    assert _steps(tmp_path) == [10, 20, 30]
    ten = ck.find_checkpoint(tmp_path, "10")
    assert ck.make_latest(tmp_path, ten) and not ck.make_latest(tmp_path, ten)  # resumed from step 10
    assert ck.find_checkpoint(tmp_path, "latest") == ten  # not step 30 of the abandoned line
    _save(tmp_path, 15)
    assert ck.find_checkpoint(tmp_path, "latest").name == "step-00000015"
    assert ck.prune_checkpoints(tmp_path, keep_last=2) == [20, 30]  # the abandoned ones go first
    assert _steps(tmp_path) == [10, 15]
    _save(tmp_path, 20, seed=3)  # the new line's step 20 replaces nothing: the old one is gone
    assert ck.find_checkpoint(tmp_path, "latest").name == "step-00000020"


def test_saving_a_step_again_replaces_it_only_when_complete(tmp_path, monkeypatch):
    model, _, path = _save(tmp_path, 4)
    before = load_file(str(path / "model.safetensors"))
    monkeypatch.setattr(faults, "_RULES", {"save.files": [(4, "enospc")]})
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-00000004.*No space left on device"):
        _save(tmp_path, 4, seed=9)
    monkeypatch.setattr(faults, "_RULES", {})
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # the partial write is removed
    after = load_file(str(ck.find_checkpoint(tmp_path, "4") / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the good one is untouched


_KILL_SAVE = """
import sys, torch
from pathlib import Path
from tfkit.train import checkpoint as ck
torch.manual_seed(int(sys.argv[2]))
m = torch.nn.Linear(4, 3)
o = torch.optim.AdamW(m.parameters())
ck.save_checkpoint(Path(sys.argv[1]), m, o, ck.TrainState(step=4))
"""


@pytest.mark.parametrize("point", ["save.begin", "save.files", "save.manifest", "save.swap"])
def test_a_kill_during_a_second_save_of_a_step_never_loses_it(tmp_path, point):
    run = [sys.executable, "-c", _KILL_SAVE, str(tmp_path)]
    subprocess.run(run + ["1"], check=True)
    first = load_file(str(tmp_path / "checkpoints/step-00000004/model.safetensors"))
    r = subprocess.run(run + ["2"], env={**os.environ, "TFKIT_FAULT": f"{point}=kill"})
    assert r.returncode == -9
    # read-only commands still find a complete step 4, even before recovery
    found = ck.find_checkpoint(tmp_path, "latest")
    assert ck.verify_checkpoint(found)["step"] == 4
    notes = ck.recover_checkpoints(tmp_path)
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert leftovers == ["step-00000004"]
    got = load_file(str(tmp_path / "checkpoints/step-00000004/model.safetensors"))
    if point in ("save.manifest", "save.swap"):  # the second write was complete: promoted, not deleted
        assert not torch.equal(got["weight"], first["weight"]) and any("completed" in n for n in notes)
    else:
        assert torch.equal(got["weight"], first["weight"])


def test_recovery_restores_a_lone_old_folder_and_clears_interrupted_pruning(tmp_path):
    _save(tmp_path, 1)
    _, _, two = _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    os.replace(two, root / "step-00000002.old")  # a crash between the two renames, tmp already gone
    (root / "step-00000003.tmp").mkdir()  # a write that never got its manifest
    (root / "step-00000001" / ".manifest.json.tmp-123").write_text("{")  # a killed manifest rewrite
    _save(tmp_path, 0)
    os.replace(root / "step-00000000", root / "step-00000000.del")  # a prune killed before its rmtree
    assert _steps(tmp_path) == [1, 2]  # step 2 listed from its .old before recovery
    notes = ck.recover_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    assert not list((root / "step-00000001").glob(".*"))
    assert any("restored" in n for n in notes) and any("removed half-written" in n for n in notes)
    ck.verify_checkpoint(root / "step-00000002")


def test_best_is_exactly_the_saved_weights_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TFKIT_HOME", str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"best_step": 3}))
    _save(tmp_path, 5)
    with pytest.raises(CheckpointError, match=r"no saved weights of its best evaluation \(step 3\)"):
        ck.find_checkpoint(tmp_path, "best")  # never silently the newest one instead
    torch.manual_seed(7)
    model = _Tiny()
    ck.save_best(tmp_path, model, 3, {"val_loss": 1.5})
    best = ck.find_checkpoint(tmp_path, "best")
    assert best.name == "best" and ck.load_state(best)["step"] == 3 and ck.load_state(best)["val_loss"] == 1.5
    loaded = _Tiny()
    ck.load_weights(loaded, best)
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    with pytest.raises(CheckpointError, match="weights only"):
        ck.load_training_state(best, loaded, torch.optim.AdamW(loaded.parameters()))
    assert _steps(tmp_path) == [5]  # best/ is not a step checkpoint and is never pruned as one


def test_first_non_finite_names_the_tensor():
    model = _Tiny()
    assert ck.first_non_finite(model) is None
    with torch.no_grad():
        model.embed.weight[2, 1] = float("inf")
    assert ck.first_non_finite(model) == "embed.weight"


_FULL_DISK = """
import resource, sys, torch
from pathlib import Path
from tfkit.errors import CheckpointError
from tfkit.train import checkpoint as ck
m = torch.nn.Linear(64, 64)
o = torch.optim.AdamW(m.parameters())
m(torch.ones(1, 64)).sum().backward(); o.step()
ck.save_checkpoint(Path(sys.argv[1]), m, o, ck.TrainState(step=1))
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # files may not grow past 8 KiB
try:
    ck.save_checkpoint(Path(sys.argv[1]), m, o, ck.TrainState(step=2))
except CheckpointError as e:
    print(e.message); sys.exit(e.exit_code)
"""


def test_a_full_disk_is_a_clear_checkpoint_error_and_keeps_the_earlier_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert re.search(r"cannot write checkpoint `.*step-00000002`: File too large \([\d,.]+ MiB free there\)", r.stdout)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    ck.verify_checkpoint(tmp_path / "checkpoints/step-00000001")


def test_source_never_unpickles():
    root = Path(__file__).resolve().parents[2] / "tfkit"
    pattern = re.compile(r"torch\.load\(|pickle\.load|allow_pickle=True")
    hits = [str(p) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []
