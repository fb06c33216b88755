"""`tfkit chat` on a tiny model trained (assistant turns only) on addition conversations: one-shot
JSON answers in the trained format that stop at the end of the turn, stdin for scripts, the
interactive commands, and `generate` stopping at the end of a turn unless `--ignore-eos`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPLY = re.compile(r"^\d+ plus \d+ is \d+\.$")


def _tfkit(args, home, input=None):
    env = {**os.environ, "TFKIT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tfkit", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, input=input)


@pytest.fixture(scope="module")
def adder(tmp_path_factory) -> tuple[Path, Path]:
    """A run that learned the format "A plus B is N." from 400 conversations (200 steps, ~10 s)."""
    home = tmp_path_factory.mktemp("home")
    d = tmp_path_factory.mktemp("data")
    with open(d / "add.jsonl", "w") as f:
        for a in range(20):
            for b in range(20):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n")
    assert _tfkit(["tokenize", d / "add.jsonl", "--vocab-size", 300, "--out", d / "tok.json"], home).returncode == 0
    assert _tfkit(["prepare", d / "add.jsonl", "--tokenizer", d / "tok.json", "--out", d / "add.bin"], home).returncode == 0
    r = _tfkit(["train", "--train-data", d / "add.bin", "--tokenizer", d / "tok.json", "--name", "adder",
                "--max-steps", 200, "--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
                "--set", "model.context_length=48", "--set", "train.batch_size=16", "--set", "optim.lr=3e-3",
                "--set", "optim.warmup_steps=20", "--set", "train.eval_steps=2"], home)
    assert r.returncode == 0, r.stderr[-2000:]
    return home, home / "runs" / "adder"


def test_chat_answers_one_message_as_json_in_the_trained_format_and_stops_at_the_end_of_its_turn(adder):
    home, _ = adder
    r = _tfkit(["chat", "adder", "--message", "What is 3 plus 4?", "--temperature", 0, "--json"], home)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stopped"] == "end_of_turn" and REPLY.match(out["reply"]), out
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"] and out["messages"][1]["content"] == out["reply"]


def test_chat_reads_the_message_from_stdin_and_streams_the_reply(adder):
    home, _ = adder
    r = _tfkit(["chat", "adder", "--temperature", 0, "--system", "Add."], home, input="What is 5 plus 6?\n")
    assert r.returncode == 0, r.stderr
    assert REPLY.match(r.stdout.strip()), r.stdout
    empty = _tfkit(["chat", "adder"], home, input="")
    assert empty.returncode == 2 and "stdin is empty" in empty.stderr


def test_the_interactive_commands(adder, monkeypatch, capsys):
    from tfkit.cli import chat as chat_cmd
    from tfkit.train.setup import load_run, run_runtime

    _, run = adder
    runtime = run_runtime(str(run))
    session = chat_cmd.Chat(load_run(str(run), attention=runtime.attention), runtime, None,
                            dict(max_new_tokens=16, temperature=0.0, top_k=None, top_p=None, seed=0))
    lines = iter(["/system Add.", "What is 1 plus 2?", "/bogus", "What is 2 plus 2?", "/reset", "/exit", "never read"])
    monkeypatch.setattr(chat_cmd.err, "input", lambda prompt="": next(lines))
    session.interact()
    assert session.messages == [{"role": "system", "content": "Add."}]  # /reset kept the system prompt
    assert next(lines) == "never read"  # /exit stopped reading
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(REPLY.match(line) for line in out)


def test_generate_stops_at_the_end_of_a_turn_unless_told_to_ignore_it(adder):
    home, _ = adder
    prompt = "<|user|>\nWhat is 7 plus 1?<|end|>\n<|assistant|>\n"
    stopped = json.loads(_tfkit(["generate", "adder", "--prompt", prompt, "--temperature", 0, "-n", 30, "--json"],
                                home).stdout)
    assert REPLY.match(stopped["text"]) and len(stopped["token_ids"]) < 30
    full = json.loads(_tfkit(["generate", "adder", "--prompt", prompt, "--temperature", 0, "-n", 30, "--ignore-eos",
                              "--json"], home).stdout)
    assert len(full["token_ids"]) == 30 and full["text"].startswith(stopped["text"] + "<|end|>")
