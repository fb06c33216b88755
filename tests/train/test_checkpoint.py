"""Checkpoints: atomic layout, manifest verification, fallback past corrupt ones, strict keys, no pickle."""

import json
import re
from pathlib import Path

import pytest
import torch

from tfkit.errors import CheckpointError
from tfkit.train import checkpoint as ck


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
    return model, opt, ck.save_checkpoint(run_dir, model, opt, ck.TrainState(step=step, tokens_seen=step * 10))


def test_layout_manifest_and_round_trip(tmp_path):
    model, opt, path = _save(tmp_path, 5)
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "optimizer.safetensors",
                                                      "rng.safetensors", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
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


def test_strict_keys_and_shapes(tmp_path):
    _, _, path = _save(tmp_path, 3)
    other = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="missing keys|unexpected keys"):
        ck.load_weights(other, path)


def test_stale_tmp_removed_and_pruning_keeps_best(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s)
    (tmp_path / "checkpoints" / "step-00000005.tmp").mkdir()
    assert ck.remove_stale_tmp(tmp_path) == ["step-00000005.tmp"]
    ck.prune_checkpoints(tmp_path, keep_last=2, best_step=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 3, 4]


def test_unknown_run_suggests_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TFKIT_HOME", str(tmp_path))
    (tmp_path / "runs" / "shakespeare").mkdir(parents=True)
    (tmp_path / "runs" / "shakespeare" / "run.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no run named 'shakespear'") as exc:
        ck.resolve_run("shakespear")
    assert "`shakespeare`" in exc.value.hint


def test_run_lock_refuses_a_second_holder(tmp_path):
    with ck.run_lock(tmp_path):
        import subprocess
        import sys

        code = ("import sys; from pathlib import Path; from tfkit.train.checkpoint import run_lock\n"
                "from tfkit.errors import CheckpointError\n"
                "try:\n    run_lock(Path(sys.argv[1])).__enter__()\nexcept CheckpointError as e:\n    print(e); sys.exit(2)")
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 2 and "locked by pid" in r.stdout


def test_source_never_unpickles():
    root = Path(__file__).resolve().parents[2] / "tfkit"
    pattern = re.compile(r"torch\.load\(|pickle\.load|allow_pickle=True")
    hits = [str(p) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []
