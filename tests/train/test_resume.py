"""`plan_resume`: what changed under a run since its checkpoint, deliberate `--set` changes, budgets."""

import json

import pytest
import yaml

from tfkit import config
from tfkit.data.dummy import make_dummy
from tfkit.errors import CheckpointError, ConfigError, DataError
from tfkit.hardware import Runtime
from tfkit.train import checkpoint as ck
from tfkit.train import runs
from tfkit.train.loop import TrainJob, run
from tfkit.train.resume import config_diff, is_finished, plan_resume
from tfkit.train.setup import new_run, resolve_data

CPU = Runtime(device="cpu", precision="fp32", attention="sdpa", compile=False, reasons={})


@pytest.fixture()
def trained(tmp_path, play):
    """A finished 6-step run on Macbeth with a real tokenizer, checkpoints at 3 and 6."""
    from tfkit.data.prepare import prepare
    from tfkit.data.tokenizer import Tokenizer

    tok = Tokenizer.train_files([play], 300)
    tok.save(tmp_path / "tok.json")
    prepare([play], tok, tmp_path / "play.bin")
    sets = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context_length=16", "train.batch_size=4",
            "train.max_steps=6", "train.eval_interval=3", "train.eval_steps=1", "train.ckpt_interval=3",
            f"data.train={tmp_path / 'play.bin'}", f"data.tokenizer={tmp_path / 'tok.json'}"]
    cfg = resolve_data(config.load(overrides=sets))
    run_dir = new_run(cfg, "base")
    run(TrainJob(cfg=cfg, runtime=CPU, run_dir=run_dir))
    return run_dir


def _edit_config(run_dir, section, key, value):
    path = run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data[section][key] = value
    path.write_text(yaml.safe_dump(data))


def _plan(run_dir, **kw):
    with runs.run_lock(run_dir):
        return plan_resume(run_dir, **kw)


def test_an_unchanged_finished_run_is_refused_as_finished_and_a_budget_continues_it(trained):
    with pytest.raises(ConfigError, match="already finished"):
        _plan(trained)
    plan = _plan(trained, max_steps=10)
    assert plan.step == 6 and plan.changes == {} and plan.allowed == {} and plan.refit_schedule
    assert plan.cfg.train.max_steps == 10 and not plan.reset_loader


def test_a_config_edit_is_refused_naming_the_field(trained):
    _edit_config(trained, "optim", "lr", 0.002)
    with pytest.raises(ConfigError) as exc:
        _plan(trained, max_steps=10)
    assert "run `base` changed since checkpoint step 6: optim.lr 0.001 -> 0.002" in exc.value.message
    assert exc.value.exit_code == 2 and "--set KEY=VALUE" in exc.value.hint and "--allow-changes" in exc.value.hint
    plan = _plan(trained, max_steps=10, allow_changes=True)
    assert plan.allowed == {"optim.lr": (0.001, 0.002)}
    plan = _plan(trained, max_steps=10, overrides=["optim.lr=0.002"])  # the edit, stated on purpose
    assert plan.changes == {"optim.lr": (0.001, 0.002)} and plan.allowed == {}


def test_budget_edits_pass_and_deliberate_sets_are_typed_and_checked(trained):
    _edit_config(trained, "train", "max_steps", 9)
    plan = _plan(trained, overrides=["optim.lr=3e-4", "train.batch_size=2"])
    assert plan.changes == {"optim.lr": (0.001, 0.0003), "train.batch_size": (4, 2)} and plan.cfg.train.max_steps == 9
    with pytest.raises(ConfigError, match="the budget is not changed with --set"):
        _plan(trained, overrides=["train.max_steps=20"])
    with pytest.raises(ConfigError, match=r"model.d_model would change the shapes of the weights"):
        _plan(trained, max_steps=10, overrides=["model.d_model=64"])
    with pytest.raises(ConfigError, match=r"optim.lr.*less than or equal to 1"):
        _plan(trained, max_steps=10, overrides=["optim.lr=1e6"])
    plan = _plan(trained, max_steps=10, overrides=["model.rope_theta=20000"])  # no shape change: allowed
    assert plan.changes == {"model.rope_theta": (10000.0, 20000.0)}


def test_changed_token_files_and_tokenizer_are_refused(trained, play, tmp_path):
    from tfkit.data.prepare import prepare
    from tfkit.data.tokenizer import Tokenizer

    data = tmp_path / "play.bin"
    original = data.read_bytes()
    tok = Tokenizer.load(tmp_path / "tok.json")
    other_text = tmp_path / "other.txt"
    other_text.write_text(play.read_text()[:60_000])
    prepare([other_text], tok, data)  # re-prepared in place from other text
    with pytest.raises(ConfigError, match=r"changed since checkpoint step 6: `.*play.bin` \(content\)"):
        _plan(trained, max_steps=10)
    plan = _plan(trained, max_steps=10, allow_changes=True)
    assert plan.reset_loader  # the old data position means nothing in the new data

    other_tok = Tokenizer.train_files([play], 400)
    prepare([play], other_tok, data)
    with pytest.raises(ConfigError, match=r"re-made with another tokenizer"):
        _plan(trained, max_steps=10)
    data.write_bytes(original)
    _plan(trained, max_steps=10)  # back as it was: accepted

    (trained / "tokenizer.json").write_text(json.dumps(json.loads((tmp_path / "tok.json").read_text()) | {"added_tokens": []}))
    with pytest.raises(ConfigError, match=r"the run's tokenizer.json"):
        _plan(trained, max_steps=10)


def test_a_deliberate_new_training_file_starts_its_data_order_afresh(trained, tmp_path):
    copy = tmp_path / "copy.bin"
    copy.write_bytes((tmp_path / "play.bin").read_bytes())
    plan = _plan(trained, max_steps=10, overrides=[f"data.train={copy}"])
    assert list(plan.changes) == ["data.train"] and not plan.reset_loader  # same content: same position
    make_dummy(tmp_path / "rand.bin", 5000, 300, seed=3)
    plan = _plan(trained, max_steps=10, overrides=[f"data.train={tmp_path / 'rand.bin'}"])
    assert plan.reset_loader


def test_a_new_training_file_must_come_from_the_runs_tokenizer(trained, play, tmp_path, monkeypatch):
    from tfkit.data.prepare import prepare
    from tfkit.data.tokenizer import Tokenizer

    prepare([play], Tokenizer.train_files([play], 280), tmp_path / "other.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"`.*other.bin` \(--set data.train\) was made by another tokenizer"):
        _plan(trained, max_steps=10, overrides=["data.train=other.bin"])
    prepare([play], Tokenizer.load(tmp_path / "tok.json"), tmp_path / "same.bin")
    plan = _plan(trained, max_steps=10, overrides=["data.train=same.bin"])  # relative to where it runs
    assert plan.cfg.data.train == str(tmp_path / "same.bin")


def test_resume_from_best_needs_a_full_checkpoint_at_that_step(trained):
    best_step = runs.read_run_info(trained)["best_step"]
    assert best_step in (3, 6)
    plan = _plan(trained, checkpoint="best", max_steps=10)
    assert plan.step == best_step and plan.checkpoint.name == ck.step_dir_name(best_step)
    ck.prune_checkpoints(trained, 0)  # no full checkpoint left; best/ keeps the weights
    with pytest.raises(CheckpointError, match="kept its weights only"):
        _plan(trained, checkpoint="best", max_steps=10)


def test_a_run_without_any_checkpoint_starts_from_step_zero(trained):
    import shutil

    shutil.rmtree(trained / "checkpoints")
    plan = _plan(trained)
    assert plan.checkpoint is None and plan.step == 0
    assert any("no checkpoint yet" in n for n in plan.notes)


def test_a_checkpoint_from_another_tfkit_version_is_noted(trained):
    path = ck.find_checkpoint(trained)
    state = json.loads((path / "state.json").read_text())
    state["tfkit_version"] = "0.0.1"
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": ck._sha256(path / "state.json"), "bytes": (path / "state.json").stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    plan = _plan(trained, max_steps=10)
    assert any("written by tfkit 0.0.1" in n for n in plan.notes)


def test_is_finished():
    cfg = config.load(overrides=["train.max_steps=10"])
    assert is_finished(cfg, {"step": 10}) and not is_finished(cfg, {"step": 9})
    assert not is_finished(cfg, {"step": 10, "eval_pending": True})
    timed = config.load(overrides=["train.max_steps=1000", "train.max_time=60s"])
    assert is_finished(timed, {"step": 50, "elapsed_s": 61.0, "schedule_steps": 400})
    assert is_finished(timed, {"step": 400, "elapsed_s": 30.0, "schedule_steps": 400})
    assert not is_finished(timed, {"step": 50, "elapsed_s": 30.0, "schedule_steps": 400})


def test_config_diff_flattens_sections():
    assert config_diff({"a": {"b": 1, "c": [1, 2]}, "d": 3}, {"a": {"b": 2, "c": [1, 2]}, "d": 3, "e": None}) == \
        {"a.b": (1, 2)}


def test_a_config_recorded_before_a_field_existed_is_not_a_change():
    """A checkpoint of an earlier tfkit has no `data.loss_on` or `model.attention_bias`: resuming it
    must not report them as changes (it did, and refused, before `with_new_defaults`)."""
    from tfkit.train.resume import config_diff, with_new_defaults

    now = config.load(preset="nano").model_dump(mode="json")
    old = json.loads(json.dumps(now))
    for section, key in (("data", "loss_on"), ("model", "attention_bias"), ("model", "head_dim"), ("model", "rope_scaling")):
        del old[section][key]
    assert set(config_diff(old, now)) == {"data.loss_on", "model.attention_bias"}
    assert config_diff(with_new_defaults(old), now) == {}
    old["optim"]["lr"] = 0.5  # a real change still shows
    assert set(config_diff(with_new_defaults(old), now)) == {"optim.lr"}
