"""The whole pipeline on one play, as a user types it:
tokenize → prepare → split → config init → train → eval → generate → list-models → resume."""

import json

import pytest
from typer.testing import CliRunner

from tfkit.cli.app import app

runner = CliRunner()


def tf(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_pipeline_on_a_play(tmp_path, play, tfkit_home):
    tok, corpus = tmp_path / "tokenizer.json", tmp_path / "corpus.bin"
    r = tf("tokenize", play, "--vocab-size", 512, "--out", tok)
    assert r.exit_code == 0, r.stderr
    r = tf("prepare", play, "--tokenizer", tok, "--out", corpus)
    assert r.exit_code == 0, r.stderr
    r = tf("split", corpus, "--val-fraction", 0.1)
    assert r.exit_code == 0, r.stderr
    train_bin, val_bin = tmp_path / "corpus.train.bin", tmp_path / "corpus.val.bin"
    assert train_bin.is_file() and val_bin.is_file()

    cfg = tmp_path / "tfkit.yaml"
    r = tf("config", "init", "--preset", "nano", "--out", cfg, "--set", "model.d_model=64", "--set", "model.n_heads=4",
           "--set", "model.n_kv_heads=2", "--set", "model.context_length=64", "--set", "train.batch_size=8",
           "--set", "train.eval_interval=20", "--set", "train.ckpt_interval=20", "--set", "optim.warmup_steps=5")
    assert r.exit_code == 0, r.stderr
    assert "# Width of the residual stream" in cfg.read_text()
    assert "max_time: 4m" in cfg.read_text()  # nano's budget; --max-steps below lifts it

    r = tf("train", "-c", cfg, "--train-data", train_bin, "--val-data", val_bin, "--tokenizer", tok,
           "--name", "macbeth", "--max-steps", 40, "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["run"] == "macbeth" and summary["step"] == 40 and summary["reason"] == "max_steps"
    assert summary["val_loss"] < 6.0 and 0 < summary["val_bits_per_byte"] < 5  # untrained: ln(512) = 6.24 nats
    assert "tfkit generate macbeth" in r.stderr

    r = tf("eval", "macbeth", "--json")
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= ev.keys()
    assert ev["perplexity"] == pytest.approx(2.718281828 ** ev["loss"], rel=1e-6)
    r2 = tf("eval", "macbeth", "--text", play, "--json", "--max-batches", 4)
    assert r2.exit_code == 0, r2.stderr
    assert json.loads(r2.stdout)["tokens"] > 0

    r = tf("generate", "macbeth", "--prompt", "MACBETH.", "--max-new-tokens", 20, "--seed", 1, "--temperature", 0)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("MACBETH.") and len(r.stdout) > len("MACBETH.\n")
    again = tf("generate", "macbeth", "--prompt", "MACBETH.", "--max-new-tokens", 20, "--seed", 1, "--temperature", 0)
    assert again.stdout == r.stdout  # greedy is deterministic

    best = json.loads(tf("eval", "macbeth", "--checkpoint", "best", "--json").stdout)  # step 20 or 40
    assert best["checkpoint"] == "best" and best["step"] in (20, 40) and best["step"] == json.loads(
        (tfkit_home / "runs/macbeth/run.json").read_text())["best_step"]
    assert tf("generate", "macbeth", "--checkpoint", "best", "-n", 5, "--seed", 1).exit_code == 0

    r = tf("list-models", "--json")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["macbeth"]
    assert rows[0]["step"] == 40 and rows[0]["arch"] == "llama" and rows[0]["size_bytes"] > 0
    assert {"params", "best_val_loss", "path"} <= rows[0].keys()

    r = tf("resume", "macbeth")
    assert r.exit_code == 2 and "already finished" in r.stderr and "--max-steps" in r.stderr
    r = tf("resume", "macbeth", "--max-steps", 50, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 50
    assert "resumed from `step-00000040`" in r.stderr


def test_unknown_run_is_a_clear_error():
    for cmd in (["eval", "nope"], ["generate", "nope"], ["resume", "nope"]):
        r = tf(*cmd)
        assert r.exit_code == 3
        assert r.stderr.startswith("error: no run named 'nope'") and "hint:" in r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_train_rejects_bad_overrides_without_traceback():
    r = tf("train", "--preset", "nano", "--set", "optim.lr=-1")
    assert r.exit_code == 2
    assert "`optim.lr` = -1" in r.stderr and "Traceback" not in r.stderr
    r = tf("train", "--preset", "nano", "--set", "model.d_modle=64")
    assert r.exit_code == 2 and "did you mean `model.d_model`?" in r.stderr


def test_train_on_missing_data_file(tmp_path):
    r = tf("train", "--preset", "nano", "--train-data", tmp_path / "none.bin")
    assert r.exit_code == 2
    assert "none.bin" in r.stderr and "hint:" in r.stderr


def test_config_init_refuses_overwrite(tmp_path):
    out = tmp_path / "c.yaml"
    assert tf("config", "init", "--out", out).exit_code == 0
    r = tf("config", "init", "--out", out)
    assert r.exit_code == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert tf("config", "init", "--preset", "tiny", "--out", out, "--force").exit_code == 0
    r = tf("config", "show", "-c", out, "--set", "optim.lr=5e-4")
    assert r.exit_code == 0 and "lr: 0.0005" in r.stdout and "d_model: 512" in r.stdout


def test_list_models_empty():
    r = tf("list-models", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == []
    r = tf("list-models")
    assert r.exit_code == 0 and "no runs" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "--temperature -1.0 must be a number >= 0"),
    (["--temperature", "nan"], "--temperature nan must be a number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be positive"),
    (["--top-p", "1.5"], "--top-p 1.5 must lie in (0, 1]"),
    (["--top-k", "0"], "--top-k 0 must be at least 1"),
])
def test_generate_rejects_bad_sampling_settings(args, needle):
    r = tf("generate", "any-run", *args)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {needle}") and "hint:" in r.stderr and "Traceback" not in r.stderr


def test_train_refuses_mismatched_files_before_creating_a_run(tmp_path, play):
    tok = tmp_path / "tok.json"
    assert tf("tokenize", play, "--vocab-size", 300, "--out", tok).exit_code == 0
    assert tf("prepare", play, "--tokenizer", tok, "--out", tmp_path / "play.bin").exit_code == 0
    assert tf("dummy-data", "--out", tmp_path / "d.bin", "--tokens", 5000, "--vocab-size", 300).exit_code == 0
    r = tf("train", "--preset", "nano", "--train-data", tmp_path / "d.bin", "--val-data", tmp_path / "play.bin",
           "--tokenizer", tok, "--name", "mismatch")
    assert r.exit_code == 2 and "were made by different tokenizers" in r.stderr
    r = tf("train", "--preset", "nano", "--train-data", tmp_path / "play.bin", "--tokenizer", tmp_path / "nope.json")
    assert r.exit_code == 2 and "nope.json" in r.stderr
    assert json.loads(tf("list-models", "--json").stdout) == []  # no half-made run folder left behind
