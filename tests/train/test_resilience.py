"""The loop under faults: signals at every phase (step, evaluation, final save), resume twice and
across epochs, RNG restore, `latest` after going back, `best` weights, NaN weights, OOM, full disk."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tfkit import config
from tfkit.data.dummy import make_dummy
from tfkit.errors import CheckpointError, ResourceError
from tfkit.hardware import Runtime
from tfkit.train import checkpoint as ck
from tfkit.train import faults, loop, runs
from tfkit.train.loop import NonFiniteLoss, TrainJob, run
from tfkit.train.resume import is_finished, plan_resume
from tfkit.train.setup import new_run, resolve_data

CPU = Runtime(device="cpu", precision="fp32", attention="sdpa", compile=False, reasons={})


def _cfg(data, sets=()):
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.context_length=16",
            "train.batch_size=4", "train.max_steps=12", "train.log_interval=1", "train.eval_interval=5",
            "train.eval_steps=2", "train.ckpt_interval=4", "train.keep_last=10", "optim.warmup_steps=3",
            f"data.train={data}", *sets]
    return resolve_data(config.load(overrides=base))


def _records(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir, "step")}


def _weights(run_dir, which="latest"):
    return load_file(str(ck.find_checkpoint(run_dir, which) / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _signal_at(sig, kind, step):
    def hook(event):
        if getattr(event, "kind", "") == kind and event.step == step:
            os.kill(os.getpid(), sig)
    return hook


@pytest.fixture()
def dummy(tmp_path):
    path = tmp_path / "dummy.bin"
    make_dummy(path, 20_000, 100, seed=1)
    return path


@pytest.fixture()
def fault(monkeypatch):
    """Set ``TFKIT_FAULT``-style rules in-process: ``fault("eval.batch", 5, "term")``."""
    rules = {}
    monkeypatch.setattr(faults, "_RULES", rules)

    def add(point, step, action):
        rules.setdefault(point, []).append((step, action))
    return add


def _reference(cfg, name="ref"):
    ref_dir = new_run(cfg, name)
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=ref_dir))
    return ref_dir


def _resume(cfg, run_dir, **kw):
    return run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir, resume=True, **kw))


def test_sigterm_right_after_an_interval_save_writes_that_step_once(dummy):
    cfg = _cfg(dummy)
    ref = _reference(cfg)
    cut = new_run(cfg, "cut")
    events = []

    def hook(event):
        events.append(event)
        _signal_at(signal.SIGTERM, "checkpoint", 4)(event)

    end = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut), on_event=hook)
    assert end.reason == "sigterm" and end.step == 4
    assert [e.step for e in events if e.kind == "checkpoint"] == [4]  # not saved a second time
    assert _resume(cfg, cut).step == 12
    assert _same(_weights(ref), _weights(cut))


def test_sigterm_during_an_evaluation_cuts_it_short_and_resume_runs_it_first(dummy, fault):
    cfg = _cfg(dummy)
    ref = _reference(cfg)
    cut = new_run(cfg, "cut")
    fault("eval.batch", 5, "term")
    end = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut))
    assert end.reason == "sigterm" and end.step == 5
    assert ck.load_state(ck.find_checkpoint(cut))["eval_pending"] is True
    assert _records(cut, "eval") == []
    faults._RULES.clear()
    events = []
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut, resume=True), on_event=events.append)
    kinds = [e.kind for e in events if e.kind in ("eval", "step")]
    assert kinds[0] == "eval" and events[[e.kind for e in events].index("eval")].step == 5
    assert [(r["step"], r["loss"]) for r in _records(cut, "eval")] == [(r["step"], r["loss"]) for r in _records(ref, "eval")]
    assert _same(_weights(ref), _weights(cut))


def test_sigterm_during_the_final_evaluation_leaves_it_for_resume(dummy, fault, tmp_path):
    cfg = _cfg(dummy)
    ref = _reference(cfg)
    cut = new_run(cfg, "cut")
    fault("eval.batch", 12, "term")
    end = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut))
    assert end.reason == "sigterm" and end.step == 12  # 143: there is work left
    assert runs.read_run_info(cut)["status"] == "interrupted"
    state = ck.load_state(ck.find_checkpoint(cut))
    assert state["step"] == 12 and state["eval_pending"] and not is_finished(cfg, state)
    faults._RULES.clear()
    with runs.run_lock(cut):
        plan = plan_resume(cut)  # not refused as finished
        again = run(TrainJob(cfg=plan.cfg, runtime=CPU, run_dir=cut, resume=True, checkpoint=plan.checkpoint))
    assert again.reason == "max_steps" and again.val_loss == _records(ref, "eval")[-1]["loss"]
    assert runs.read_run_info(cut)["status"] == "finished"
    assert is_finished(cfg, ck.load_state(ck.find_checkpoint(cut)))


def test_sigterm_during_the_final_save_completes_it(dummy, fault):
    cfg = _cfg(dummy)
    ref = _reference(cfg)
    cut = new_run(cfg, "cut")
    fault("save.files", 12, "term")
    end = run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut))
    assert end.reason == "max_steps"  # every step and the final evaluation were done
    assert runs.read_run_info(cut)["status"] == "finished"
    assert _same(_weights(ref), _weights(cut))


def test_a_second_ctrl_c_waits_until_the_checkpoint_is_complete(dummy, fault):
    cfg = _cfg(dummy)
    cut = new_run(cfg, "cut")
    fault("save.begin", 4, "int")
    fault("save.begin", 4, "int")
    with pytest.raises(KeyboardInterrupt):
        run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut))
    ck.verify_checkpoint(ck.find_checkpoint(cut, "4"))
    assert runs.read_run_info(cut)["status"] == "interrupted"


def test_free_arch_resumes_bit_exactly_and_the_rng_restore_is_what_makes_it(dummy, monkeypatch):
    cfg = _cfg(dummy, ["model.arch=free", "train.ckpt_interval=0"])
    ref = _reference(cfg)
    ref_losses = _losses(ref)
    cut = new_run(cfg, "cut")
    assert run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut), on_event=_signal_at(signal.SIGTERM, "step", 7)).step == 7
    _resume(cfg, cut)
    assert [_losses(cut)[s] for s in range(8, 13)] == [ref_losses[s] for s in range(8, 13)]
    assert _same(_weights(ref), _weights(cut))

    unrestored = new_run(cfg, "no-rng")
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=unrestored), on_event=_signal_at(signal.SIGTERM, "step", 7))
    monkeypatch.setattr(ck, "set_rng_state", lambda tensors, meta: None)
    _resume(cfg, unrestored)
    assert [_losses(unrestored)[s] for s in range(8, 13)] != [ref_losses[s] for s in range(8, 13)]


def test_resume_twice_across_epoch_boundaries(tmp_path):
    small = tmp_path / "small.bin"
    make_dummy(small, 700, 100, seed=2)  # ~40 windows of 16: an epoch every ~10 steps of batch 4
    cfg = _cfg(small, ["train.max_steps=30", "train.ckpt_interval=0", "train.eval_interval=0"])
    ref = _reference(cfg)
    cut = new_run(cfg, "cut")
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut), on_event=_signal_at(signal.SIGTERM, "step", 9))
    epoch = ck.load_state(ck.find_checkpoint(cut))["loader"]["epoch"]
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=cut, resume=True), on_event=_signal_at(signal.SIGTERM, "step", 21))
    later = ck.load_state(ck.find_checkpoint(cut))["loader"]["epoch"]
    assert later > epoch  # the second cut is epochs later than the first
    assert _resume(cfg, cut).step == 30
    assert [_losses(cut)[s] for s in range(1, 31)] == [_losses(ref)[s] for s in range(1, 31)]
    assert _same(_weights(ref), _weights(cut))


def test_latest_after_going_back_to_an_older_checkpoint(dummy):
    cfg = _cfg(dummy, ["train.ckpt_interval=3", "train.keep_last=10", "train.eval_interval=0"])
    ref = _reference(cfg)
    back = _reference(cfg, "back")
    assert [s for s, _ in ck.list_checkpoints(back)] == [3, 6, 9, 12]
    fewer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"keep_last": 2})})
    end = run(TrainJob(cfg=fewer, runtime=CPU, run_dir=back, resume=True, checkpoint="6"),
              on_event=_signal_at(signal.SIGTERM, "step", 8))
    assert end.step == 8
    assert ck.find_checkpoint(back, "latest").name == "step-00000008"  # not step 12 of the abandoned line
    assert [s for s, _ in ck.list_checkpoints(back)] == [6, 8]  # pruning kept what was just written
    assert _resume(fewer, back).step == 12
    assert _same(_weights(ref), _weights(back))


def test_best_keeps_the_weights_of_the_best_evaluation(dummy):
    cfg = _cfg(dummy, ["train.ckpt_interval=1", "train.keep_last=100", "train.eval_interval=3", "train.max_steps=9"])
    run_dir = _reference(cfg, "every")
    best_step = runs.read_run_info(run_dir)["best_step"]
    best = ck.find_checkpoint(run_dir, "best")
    assert best.name == "best" and ck.load_state(best)["step"] == best_step
    assert _same(load_file(str(best / "model.safetensors")), _weights(run_dir, str(best_step)))

    sparse = _cfg(dummy, ["train.ckpt_interval=0", "train.eval_interval=3", "train.max_steps=9"])
    other = _reference(sparse, "sparse")  # evaluations at 3, 6, 9; a checkpoint only at the end
    assert [s for s, _ in ck.list_checkpoints(other)] == [9]
    state = ck.load_state(ck.find_checkpoint(other, "best"))
    assert state["step"] == runs.read_run_info(other)["best_step"]
    assert state["val_loss"] == min(r["loss"] for r in _records(other, "eval"))
    if state["step"] != 9:
        assert not _same(_weights(other, "best"), _weights(other))  # not the newest weights in disguise


def _capture_model(monkeypatch):
    holder = {}
    real = loop.build_model

    def build(*args, **kwargs):
        holder["model"] = real(*args, **kwargs)
        return holder["model"]
    monkeypatch.setattr(loop, "build_model", build)
    return holder


def test_non_finite_weights_are_never_written_and_the_run_is_marked_diverged(dummy, monkeypatch):
    cfg = _cfg(dummy, ["train.eval_interval=0"])
    holder = _capture_model(monkeypatch)
    run_dir = new_run(cfg, "nan-weights")

    def poison(event):
        if event.kind == "step" and event.step == 8:
            with torch.no_grad():
                holder["model"].norm.weight[0] = float("nan")

    with pytest.raises(NonFiniteLoss, match=r"weight `norm.weight` holds NaN or Inf at step 8"):
        run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir), on_event=poison)
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [4]
    assert runs.read_run_info(run_dir)["status"] == "diverged"


def test_out_of_memory_is_a_clear_error_with_smaller_settings(dummy, monkeypatch):
    cfg = _cfg(dummy, ["train.eval_interval=0"])
    holder = _capture_model(monkeypatch)
    run_dir = new_run(cfg, "oom")

    def starve(event):
        if event.kind == "step" and event.step == 5:
            def forward(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            holder["model"].forward = forward

    with pytest.raises(ResourceError) as exc:
        run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir), on_event=starve)
    assert exc.value.exit_code == 1
    assert exc.value.message.startswith("out of memory on cpu at step 6 (micro-batch 4 x 16 tokens")
    assert "`--set train.batch_size=2 --set train.grad_accum_steps=2`" in exc.value.hint
    assert "system.grad_checkpointing=true" in exc.value.hint and "tfkit resume oom" in exc.value.hint
    assert runs.read_run_info(run_dir)["status"] == "failed"
    ck.verify_checkpoint(ck.find_checkpoint(run_dir, "4"))


def test_a_full_disk_during_a_save_fails_the_run_and_keeps_earlier_checkpoints(dummy, fault):
    cfg = _cfg(dummy, ["train.eval_interval=0"])
    run_dir = new_run(cfg, "full")
    fault("save.files", 8, "enospc")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint `.*step-00000008`: No space left on device"):
        run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir))
    info = runs.read_run_info(run_dir)
    assert info["status"] == "failed" and "No space left" in info["error"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004"]
    faults._RULES.clear()
    assert _resume(cfg, run_dir).step == 12  # and the run goes on once there is room


def test_checkpoints_and_env_json_record_what_produced_them(dummy):
    cfg = _cfg(dummy)
    run_dir = _reference(cfg, "prov")
    state = ck.load_state(ck.find_checkpoint(run_dir))
    assert state["config"] == cfg.model_dump(mode="json") and state["config_fingerprint"] == cfg.fingerprint()
    assert state["data"]["train"]["path"] == str(dummy) and state["data"]["train"]["fingerprint"]
    session = json.loads((run_dir / "env.json").read_text())["sessions"][0]
    assert session["event"] == "train" and session["torch"] == torch.__version__
    assert session["data"] == state["data"] and session["device"] == "cpu"


def test_a_half_written_metrics_line_stays_one_bad_line(dummy):
    cfg = _cfg(dummy)
    run_dir = new_run(cfg, "torn")
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir), on_event=_signal_at(signal.SIGTERM, "step", 6))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "kind": "st')  # a process killed in the middle of a write
    _resume(cfg, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    bad = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    assert bad == ['{"time": 1, "kind": "st'] and json.loads(lines[-1])["kind"] == "end"
