"""`tfkit train/resume --nproc-per-node 2`: two real processes on gloo (torchrun's agent), compared
with one process: same samples, losses and weights; FSDP2 = DDP; interrupted + resumed = uninterrupted;
SIGTERM to one rank stops both; a 2-rank checkpoint serves single-process eval and generate."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 8
_SETS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context_length=16", "train.batch_size=4",
         "train.grad_accum_steps=2", "train.eval_interval=4", "train.eval_steps=3", "train.ckpt_interval=3",
         "train.log_interval=1", "optim.warmup_steps=2"]
_ENV = {"OMP_NUM_THREADS": "1", "TFKIT_FAULT": ""}


def _tfkit(args, home, fault="", env=None, timeout=240):
    e = {**os.environ, **_ENV, "TFKIT_HOME": str(home), "TFKIT_FAULT": fault, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tfkit", *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=timeout)


def _train(data, tok, name, extra=(), steps=STEPS):
    args = ["train", "--train-data", data, "--tokenizer", tok, "--name", name, "--max-steps", steps]
    for s in [*_SETS, *extra]:
        args += ["--set", s]
    return args


def _run(home, name):
    return Path(home) / "runs" / name


def _weights(home, name, step=STEPS):
    return load_file(str(_run(home, name) / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def _losses(home, name):
    out = {}
    for line in (_run(home, name) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "step":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, play):
    d = tmp_path_factory.mktemp("corpus")
    home = tmp_path_factory.mktemp("home")
    tok, data = d / "tokenizer.json", d / "play.bin"
    assert _tfkit(["tokenize", play, "--vocab-size", 300, "--out", tok], home).returncode == 0
    assert _tfkit(["prepare", play, "--tokenizer", tok, "--out", data], home).returncode == 0
    return data, tok


@pytest.fixture(scope="module")
def play():
    from tests.conftest import CORPUS

    return CORPUS / "macbeth.txt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """One process, 2-rank DDP and 2-rank FSDP2 runs of one config, in one TFKIT_HOME."""
    data, tok = corpus
    home = tmp_path_factory.mktemp("runs")
    results = {
        "one": _tfkit(_train(data, tok, "one"), home),
        "ddp": _tfkit(_train(data, tok, "ddp", ["system.distributed=ddp"]) + ["--nproc-per-node", 2], home),
        "fsdp": _tfkit(_train(data, tok, "fsdp", ["system.distributed=fsdp"]) + ["--nproc-per-node", 2], home),
    }
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
    return home, results


def _close(a, b, atol):
    return sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_two_ddp_ranks_train_what_one_process_trains(runs):
    home, results = runs
    assert "DDP over 2 processes (gloo)" in results["ddp"].stderr
    assert "grad_accum_steps 2 = 1 per rank x 2 ranks" in results["ddp"].stderr
    one, ddp = _losses(home, "one"), _losses(home, "ddp")
    assert sorted(ddp) == list(range(1, STEPS + 1))  # every step logged once, by rank 0 alone
    assert all(abs(one[s] - ddp[s]) < 1e-5 for s in one)  # the same samples, so the same losses
    assert _close(_weights(home, "one"), _weights(home, "ddp"), 1e-5)
    info = json.loads((_run(home, "ddp") / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == STEPS
    env = json.loads((_run(home, "ddp") / "env.json").read_text())
    assert env["sessions"][-1]["world_size"] == 2


def test_fsdp2_trains_what_ddp_trains(runs):
    home, results = runs
    assert "FSDP over 2 processes (gloo)" in results["fsdp"].stderr
    ddp, fsdp = _losses(home, "ddp"), _losses(home, "fsdp")
    assert all(abs(ddp[s] - fsdp[s]) < 1e-5 for s in ddp)
    assert _close(_weights(home, "ddp"), _weights(home, "fsdp"), 1e-5)
    # one checkpoint format: the same tensor names (the tied embedding once), the same optimizer keys
    a = load_file(str(_run(home, "ddp") / f"checkpoints/step-{STEPS:08d}/optimizer.safetensors"))
    b = load_file(str(_run(home, "fsdp") / f"checkpoints/step-{STEPS:08d}/optimizer.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_two_rank_checkpoint_serves_single_process_eval_and_generate(runs):
    home, _ = runs
    r = _tfkit(["eval", "fsdp", "--json"], home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] > 0
    r = _tfkit(["generate", "ddp", "--prompt", "MACBETH:", "--max-new-tokens", 8, "--seed", 1], home)
    assert r.returncode == 0 and r.stdout.startswith("MACBETH:"), r.stderr


def test_two_ranks_killed_and_resumed_equal_the_uninterrupted_run(runs, corpus):
    home, _ = runs
    data, tok = corpus
    cut = _tfkit(_train(data, tok, "cut", ["system.distributed=ddp"]) + ["--nproc-per-node", 2], home,
                 fault="step.end@5#1=kill")  # rank 1 dies after step 5; the step-3 checkpoint remains
    assert cut.returncode == 137 and "rank 1 was killed by SIGKILL" in cut.stderr  # said once, by the launcher
    assert "rank 0: another process of this run stopped" in cut.stderr and "Traceback" not in cut.stderr
    r = _tfkit(["resume", "cut", "--nproc-per-node", 2], home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from `step-00000003`" in r.stderr
    want, got = _weights(home, "ddp"), _weights(home, "cut")
    assert all(torch.equal(want[k], got[k]) for k in want)  # bit-exact on CPU/gloo
    assert [_losses(home, "cut")[s] for s in range(4, STEPS + 1)] == [_losses(home, "ddp")[s] for s in range(4, STEPS + 1)]


def test_a_two_rank_checkpoint_resumes_in_one_process_and_says_it_is_not_bit_exact(runs, corpus):
    home, _ = runs
    data, tok = corpus
    assert _tfkit(_train(data, tok, "shrink", ["system.distributed=fsdp"], steps=4) + ["--nproc-per-node", 2],
                  home).returncode == 0
    r = _tfkit(["resume", "shrink", "--max-steps", 6], home)
    assert r.returncode == 0, r.stderr
    assert "written by 2 process(es), this session runs 1" in r.stderr and "not bit-exactly" in r.stderr
    assert sorted(_losses(home, "shrink")) == list(range(1, 7))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_rank_1_alone_stops_both_ranks_at_one_step_with_one_checkpoint(runs, corpus):
    """The two ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*), so each one's
    own exit code can be read."""
    home, _ = runs
    data, tok = corpus
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **_ENV, "TFKIT_HOME": str(home), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TFKIT_FAULT": "step.end@5#1=term"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tfkit", *map(str, _train(data, tok, "term", steps=50))],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs[0][1][-1500:] + outs[1][1][-1500:]
    assert "step 5 (sigterm)" in outs[0][1] and outs[1][1].strip() == ""  # rank 1 speaks only on errors
    ckpts = sorted(p.name for p in (_run(home, "term") / "checkpoints").iterdir())
    assert ckpts == ["best", "step-00000003", "step-00000005"]
    assert json.loads((_run(home, "term") / "run.json").read_text())["status"] == "interrupted"


def test_an_error_on_rank_0_is_said_once_and_every_rank_exits_with_its_code(runs, corpus):
    """Rank 1 hears rank 0's error and exits with rank 0's exit code without repeating it; a rank's
    own error carries a literal ``[rank N]`` prefix."""
    home, _ = runs
    data, tok = corpus
    port = _free_port()
    procs = []
    for rank in (0, 1):  # "one" exists already: rank 0 refuses to make the run again
        env = {**os.environ, **_ENV, "TFKIT_HOME": str(home), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tfkit", *map(str, _train(data, tok, "one", steps=2))],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs[0][1][-1500:] + outs[1][1][-1500:]
    assert "error: run `one` already exists" in outs[0][1] and outs[1][1].strip() == ""
    r = subprocess.run([sys.executable, "-c", "from tfkit.cli.app import report; report('disk full', 'free some')"],
                       env={**os.environ, "RANK": "1", "WORLD_SIZE": "2"}, capture_output=True, text=True)
    assert r.stderr.splitlines() == ["[rank 1] error: disk full", "hint: free some"]


def test_two_ranks_count_each_assistant_token_once_as_one_process_does(runs, corpus, tmp_path):
    """Conversation data (assistant-only loss): each rank counts its micro-batch's targets, the
    ranks sum them, and the step's loss equals the single-process one."""
    home, _ = runs
    _, tok = corpus
    with open(tmp_path / "chats.jsonl", "w") as f:
        for a in range(200):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus 1?"},
                                             {"role": "assistant", "content": f"It is {a + 1}."}]}) + "\n")
    chats = tmp_path / "chats.bin"
    assert _tfkit(["prepare", tmp_path / "chats.jsonl", "--tokenizer", tok, "--out", chats], home).returncode == 0
    # one process: a single micro-batch of 8 windows; two ranks: 4 windows each. A mean of the two
    # ranks' means would differ from the one process's mean (their counts differ); a count-weighted sum does not
    for name, extra in (("chat-one", ["train.batch_size=8", "train.grad_accum_steps=1"]),
                        ("chat-ddp", ["system.distributed=ddp"])):
        r = _tfkit(_train(chats, tok, name, extra, steps=3) + (["--nproc-per-node", 2] if name == "chat-ddp" else []), home)
        assert r.returncode == 0, r.stderr[-2000:]

    def steps(name):
        lines = (_run(home, name) / "metrics.jsonl").read_text().splitlines()
        return {x["step"]: (x["loss"], x["stats"]["loss_tokens"]) for x in map(json.loads, lines) if x.get("kind") == "step"}

    one, ddp = steps("chat-one"), steps("chat-ddp")
    assert sorted(one) == sorted(ddp) == [1, 2, 3]
    for s in one:
        assert ddp[s][1] == one[s][1] < 8 * 16 and abs(ddp[s][0] - one[s][0]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mod", "dtf", "free", "mhc"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_arch_trains_under_ddp_and_fsdp2(runs, corpus, arch, mode):
    home, _ = runs
    data, tok = corpus
    name = f"{arch}-{mode}"
    r = _tfkit(_train(data, tok, name, [f"model.arch={arch}", f"system.distributed={mode}"], steps=2)
               + ["--nproc-per-node", 2], home)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(_losses(home, name)) == [1, 2]
    one = _tfkit(_train(data, tok, f"{name}-1", [f"model.arch={arch}"], steps=2), home)
    assert one.returncode == 0, one.stderr[-2000:]
    # the same samples and initial weights: the first step's loss agrees with one process (the Free
    # Transformer draws its latents at random, each rank from a stream of its own: no exact match)
    if arch != "free":
        assert abs(_losses(home, name)[1] - _losses(home, f"{name}-1")[1]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_compiled_steps_under_ddp_and_fsdp2_train_what_eager_steps_train(runs, corpus, mode):
    """torch.compile (the CUDA default) around DDP, and per shard unit under FSDP2."""
    home, _ = runs
    data, tok = corpus
    name = f"compiled-{mode}"
    r = _tfkit(_train(data, tok, name, [f"system.distributed={mode}", "system.compile=true"], steps=3)
               + ["--nproc-per-node", 2], home, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    eager, compiled = _losses(home, mode), _losses(home, name)
    assert all(abs(eager[s] - compiled[s]) < 1e-4 for s in (1, 2, 3))
