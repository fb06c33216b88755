"""Distributed pieces that need no second process: how ranks split the batches, the DDP/FSDP2
choice, name-keyed optimizer state, per-rank RNG in a checkpoint, rank-targeted faults, and the
host syncs of a training step."""

import json

import numpy as np
import pytest
import torch

from tfkit import hardware
from tfkit.config import load
from tfkit.data.loader import BatchLoader
from tfkit.errors import HardwareError
from tfkit.hardware import Runtime
from tfkit.train import checkpoint as ck
from tfkit.train import faults


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_take_disjoint_batches_that_together_are_the_single_process_batches(world):
    tokens = np.arange(5_000, dtype=np.uint16)
    single = BatchLoader(tokens, batch_size=3, context_length=8, seed=5)
    ranks = [BatchLoader(tokens, batch_size=3, context_length=8, seed=5) for _ in range(world)]
    for _ in range(7):  # optimizer steps of `world` micro-batches each
        want = [single.next_batch()[0] for _ in range(world)]
        got = [ranks[r].next_batch(r, world)[0] for r in range(world)]
        for r in range(world):  # rank r holds the r-th micro-batch of the shared stream
            assert torch.equal(got[r], want[r])
        firsts = [set(g[:, 0].tolist()) for g in got]
        assert all(not (firsts[a] & firsts[b]) for a in range(world) for b in range(a + 1, world))
    # every rank stands where the single process stands, so rank 0's loader state is the run's
    assert all(r.state_dict() == single.state_dict() for r in ranks)


_CPU = Runtime(device="cpu", precision="fp32", attention="sdpa", compile=False)


def test_auto_picks_ddp_when_the_model_fits_and_fsdp_when_it_does_not():
    hw = hardware.fake_hardware({"cpu_cores": 8, "ram_bytes": 64 * hardware.GiB})
    small = load(preset="nano", overrides=["model.vocab_size=4096"])
    rt = hardware.resolve_distributed(small, hw, _CPU, 2)
    assert (rt.distributed, rt.world_size) == ("ddp", 2) and "fits one device" in rt.reasons["distributed"]
    tiny_ram = hardware.fake_hardware({"cpu_cores": 8, "ram_bytes": 64 * 2**20})
    rt = hardware.resolve_distributed(small, tiny_ram, _CPU, 2)
    assert rt.distributed == "fsdp" and "does not fit one device" in rt.reasons["distributed"]
    assert hardware.resolve_distributed(small, hw, _CPU, 1).distributed == "none"
    forced = load(preset="nano", overrides=["system.distributed=fsdp"])
    assert hardware.resolve_distributed(forced, hw, _CPU, 2).distributed == "fsdp"


def test_each_rank_gets_its_own_gpu_and_none_with_several_processes_is_refused():
    hw = hardware.fake_hardware("h100")
    cfg = load(preset="nano")
    gpu = hardware.resolve(cfg.system, hw)
    with pytest.raises(HardwareError, match="rank 1 on this node has no GPU"):
        hardware.resolve_distributed(cfg, hw, gpu, 2, local_rank=1)
    assert hardware.resolve_distributed(cfg, hw, gpu, 2, local_rank=0).device == "cuda:0"
    with pytest.raises(HardwareError, match="system.distributed=none, but torchrun started 2 processes"):
        hardware.resolve_distributed(load(preset="nano", overrides=["system.distributed=none"]), hw, _CPU, 2)


def _trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_state_is_saved_by_parameter_name_and_loads_in_any_parameter_order(tmp_path):
    model, opt = _trained()
    path = ck.save_checkpoint(tmp_path, model, opt, ck.TrainState(step=1))
    from safetensors.torch import load_file

    keys = set(load_file(str(path / "optimizer.safetensors")))
    assert "state.0.weight.exp_avg" in keys and "state.1.bias.exp_avg_sq" in keys  # names, not positions
    groups = json.loads((path / "state.json").read_text())["optimizer_param_groups"]
    assert groups[0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    fresh, _ = _trained(seed=1)
    reordered = torch.optim.AdamW(list(fresh.parameters())[::-1], lr=0.1)  # another parameter order
    ck.load_training_state(path, fresh, reordered)
    for p_name, p in fresh.named_parameters():
        want = opt.state[dict(model.named_parameters())[p_name]]["exp_avg"]
        assert torch.equal(reordered.state[p]["exp_avg"], want)


def test_checkpoints_keep_every_ranks_rng_and_a_rank_gets_its_own(tmp_path):
    model, opt = _trained()
    torch.manual_seed(11)
    rank0 = ck.rng_state()
    torch.manual_seed(22)
    rank1 = ck.rng_state()
    path = ck.save_checkpoint(tmp_path, model, opt, ck.TrainState(step=3), rng=[rank0, rank1])
    files = ck.read_training_state(path)
    assert files.world_size == 2
    for rank, seed in ((0, 11), (1, 22), (5, 11)):  # a rank the checkpoint did not have: rank 0's
        ck.set_rng_state(*ck.rng_of_rank(files.rng, files.data, rank))
        got = torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(got, torch.rand(3)), rank


def test_a_fault_rule_can_target_one_rank():
    assert faults._parse("step.end@5#1=term", rank=1) == {"step.end": [(5, "term")]}
    assert faults._parse("step.end@5#1=term", rank=0) == {}
    assert faults._parse("save.begin=kill", rank=3) == {"save.begin": [(None, "kill")]}


class _SyncCounter:
    """Counts the calls from tfkit's code that make the host wait for a tensor's value (PyTorch's
    own CPU-side bookkeeping, such as AdamW's CPU step counters, is not a device sync)."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        import sys
        from pathlib import Path

        import tfkit

        root = str(Path(tfkit.__file__).parent)
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=original, **k):
                if sys._getframe(1).f_code.co_filename.startswith(root):
                    self.count += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_a_training_step_reads_nothing_back_between_log_intervals(tmp_path, monkeypatch):
    from tfkit.data.dummy import make_dummy
    from tfkit.train.loop import TrainJob, _Trainer
    from tfkit.train.setup import new_run, resolve_data

    make_dummy(tmp_path / "d.bin", 5_000, 64, seed=0)
    cfg = resolve_data(load(preset="nano", overrides=[
        f"data.train={tmp_path / 'd.bin'}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.context_length=16", "train.batch_size=2", "train.grad_accum_steps=3", "train.max_steps=30",
        "train.log_interval=10", "train.eval_interval=0", "train.ckpt_interval=0", "train.max_time="]))
    trainer = _Trainer(TrainJob(cfg=cfg, runtime=_CPU, run_dir=new_run(cfg, "syncs")), lambda e, show=True: None)
    trainer.build()
    trainer.restore()
    trainer.begin()
    trainer.model.train()
    trainer.session_start = trainer.elapsed_before = 0.0
    trainer.window, trainer.step_times = (0.0, 0, 0), []
    trainer.train_step()
    trainer.maybe_log()  # step 1 is always shown
    counter = _SyncCounter(monkeypatch)
    for _ in range(9):  # steps 2..10: one read-back, at step 10
        trainer.train_step()
        trainer.maybe_log()
    assert counter.count == 1
    assert trainer.pending == []
