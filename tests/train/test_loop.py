"""The training loop: bit-exact resume (also inside grad accumulation), SIGTERM, non-finite loss."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tfkit import config
from tfkit.data.dummy import make_dummy
from tfkit.hardware import Runtime
from tfkit.train import checkpoint as ckpt_mod
from tfkit.train import runs
from tfkit.train.loop import NonFiniteLoss, TrainJob, run
from tfkit.train.setup import new_run, resolve_data

CPU = Runtime(device="cpu", precision="fp32", attention="sdpa", compile=False, reasons={})


def _cfg(data, name_sets=()):
    sets = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.context_length=16",
            "train.batch_size=4", "train.max_steps=12", "train.log_interval=1", "train.eval_interval=5",
            "train.eval_steps=2", "train.ckpt_interval=0", "optim.warmup_steps=3", f"data.train={data}", *name_sets]
    return resolve_data(config.load(overrides=sets))


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "step"}


@pytest.fixture()
def dummy(tmp_path):
    path = tmp_path / "dummy.bin"
    make_dummy(path, 20_000, 100, seed=1)
    return path


@pytest.mark.parametrize("accum, prefetch", [(1, False), (2, False), (2, True)])
def test_resume_after_sigterm_is_bit_exact(dummy, accum, prefetch, monkeypatch):
    from tfkit.train import loop

    monkeypatch.setattr(loop, "prefetches", lambda rt: prefetch)  # batches drawn ahead, as on a GPU
    cfg = _cfg(dummy, [f"train.grad_accum_steps={accum}"])
    ref_dir = new_run(cfg, f"ref-{accum}-{prefetch}")
    ref = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=ref_dir))
    assert ref.step == 12 and ref.reason == "max_steps"

    cut_dir = new_run(cfg, f"cut-{accum}-{prefetch}")

    def stop_at_7(event):
        if getattr(event, "kind", "") == "step" and event.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut_dir), on_event=stop_at_7)
    assert first.reason == "sigterm" and first.step == 7
    assert [s for s, _ in ckpt_mod.list_checkpoints(cut_dir)] == [7]
    second = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut_dir, resume=True))
    assert second.step == 12

    ref_losses, cut_losses = _losses(ref_dir), _losses(cut_dir)
    assert [cut_losses[s] for s in range(8, 13)] == [ref_losses[s] for s in range(8, 13)]  # bitwise equal
    a = load_file(str(ckpt_mod.find_checkpoint(ref_dir) / "model.safetensors"))
    b = load_file(str(ckpt_mod.find_checkpoint(cut_dir) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_falls_on_a_play_and_run_info_is_written(play, tmp_path):
    from tfkit.data.prepare import prepare
    from tfkit.data.tokenizer import Tokenizer

    tok = Tokenizer.train_files([play], 512)
    tok.save(tmp_path / "tok.json")
    prepare([play], tok, tmp_path / "play.bin")
    cfg = _cfg(tmp_path / "play.bin", ["train.max_steps=30", "optim.lr=1e-2", "train.log_interval=7",
                                       f"data.tokenizer={tmp_path / 'tok.json'}"])
    run_dir = new_run(cfg, "falls")
    events = []
    end = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir), on_event=events.append)
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 31))  # metrics.jsonl has every step, whatever the log interval
    assert [e.step for e in events if e.kind == "step"] == [1, 7, 14, 21, 28, 30]
    assert losses[1] > 6.0 and losses[30] < losses[1] - 1.0  # from ~ln(512) toward the unigram entropy
    info = runs.read_run_info(run_dir)
    assert info["status"] == "finished" and info["step"] == 30
    assert info["best_val_loss"] == min(e.loss for e in events if e.kind == "eval")
    evals = [e for e in events if e.kind == "eval"]
    assert end.val_loss == pytest.approx(evals[-1].loss)
    assert 0 < evals[-1].bits_per_byte < evals[-1].loss  # ~3.5 bytes/token: bpb = loss/(ln2 * bytes/token)
    assert (run_dir / "train.log").read_text().count("step 30/30") == 1


def test_non_finite_loss_stops_before_the_update(dummy):
    cfg = _cfg(dummy, ["optim.warmup_steps=0", "optim.grad_clip=0", "train.max_steps=20"])
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 1e30})})  # past validation (lr <= 1)
    run_dir = new_run(cfg, "nan")
    with pytest.raises(NonFiniteLoss, match=r"non-finite .* at step \d+") as exc:
        run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir))
    assert "`tfkit resume nan --set optim.lr=2.5e+29`" in exc.value.hint  # a quarter of the lr that diverged
    assert ckpt_mod.list_checkpoints(run_dir) == []  # nothing holding NaN was saved
    assert runs.read_run_info(run_dir)["status"] == "diverged"


def test_time_budget_fits_schedule(dummy):
    cfg = _cfg(dummy, ["train.max_steps=100000", "train.max_time=3s", "train.eval_interval=0"])
    run_dir = new_run(cfg, "timed")
    events = []
    end = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir, time_budget_s=3.0), on_event=events.append)
    fitted = [e for e in events if e.kind == "schedule"]
    assert len(fitted) == 1 and 8 <= fitted[0].schedule_steps < 100000
    assert end.reason in ("schedule_done", "max_time")
    assert end.step <= fitted[0].schedule_steps


def _stop_at(step):
    def hook(event):
        if getattr(event, "kind", "") == "step" and event.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_curriculum_switches_context_length_and_resumes_bit_exact(dummy):
    cfg = _cfg(dummy, ["train.curriculum=[{step: 0, context_length: 8}, {step: 6, context_length: 16}]"])
    ref_dir = new_run(cfg, "cur-ref")
    events = []
    ref = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=ref_dir), on_event=events.append)
    assert ref.tokens_seen == 6 * 4 * 8 + 6 * 4 * 16  # batch 4: six steps at 8 tokens, six at 16
    notes = [e.text for e in events if e.kind == "message" and "curriculum" in e.text]
    assert notes == ["curriculum phase 1 from step 6: context_length 16"]

    for stop in (6, 8):  # at the phase boundary, and inside the second phase
        cut_dir = new_run(cfg, f"cur-cut-{stop}")
        assert run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut_dir), on_event=_stop_at(stop)).step == stop
        assert run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut_dir, resume=True)).tokens_seen == ref.tokens_seen
        ref_losses, cut_losses = _losses(ref_dir), _losses(cut_dir)
        assert [cut_losses[s] for s in range(stop + 1, 13)] == [ref_losses[s] for s in range(stop + 1, 13)]


def test_init_from_loads_matching_tensors_and_reports_the_new_ones(dummy):
    src_cfg = _cfg(dummy, ["train.max_steps=3"])
    src_dir = new_run(src_cfg, "src-llama")
    run(TrainJob(cfg=src_cfg, runtime=CPU, run_dir=src_dir))
    src_ckpt = ckpt_mod.find_checkpoint(src_dir)
    source = load_file(str(src_ckpt / "model.safetensors"))

    cfg = _cfg(dummy, ["model.arch=mod", "train.max_steps=1", "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_steps=0"])
    run_dir = new_run(cfg, "dst-mod")
    events = []
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir, init_from=src_ckpt), on_event=events.append)
    lines = [e.text for e in events if e.kind == "message" and ("init from" in e.text or "new (fresh" in e.text)]
    assert lines[0].startswith(f"init from `src-llama/{src_ckpt.name}`: loaded {len(source)} tensors")
    assert lines[1].startswith("new (fresh init), 3 tensors") and "routers.1.weight" in lines[1]
    after = load_file(str(ckpt_mod.find_checkpoint(run_dir) / "model.safetensors"))
    for k, v in source.items():  # lr 1e-12: one step leaves the loaded weights (nearly) as they were
        torch.testing.assert_close(after[k], v, atol=1e-9, rtol=0)
