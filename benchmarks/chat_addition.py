"""End to end on the CPU: synthetic addition conversations -> tokenizer -> token file with an
assistant-only loss mask -> the nano preset for a few minutes -> answers to held-out questions.

Prints one JSON object: data sizes, the run's final losses, and over the held-out questions how
many answers have the trained format ("A plus B is N."), stop at the end of their turn, and are right.

    python benchmarks/chat_addition.py                  # 2 minutes of training (nano)
    python benchmarks/chat_addition.py --minutes 5 --questions 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tfkit(*args: str, env: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "tfkit", *args], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr[-3000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--max-operand", type=int, default=99)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfkit-chat-"))
    env = {**os.environ, "TFKIT_HOME": str(work / "home")}
    rng = random.Random(0)
    pairs = [(x, y) for x in range(a.max_operand + 1) for y in range(a.max_operand + 1)]
    rng.shuffle(pairs)
    held, train = pairs[:a.questions], pairs[a.questions:]
    with open(work / "train.jsonl", "w") as f:
        for x, y in train:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {x} plus {y}?"},
                                             {"role": "assistant", "content": f"{x} plus {y} is {x + y}."}]}) + "\n")
    _tfkit("tokenize", str(work / "train.jsonl"), "--vocab-size", "512", "--out", str(work / "tok.json"), env=env)
    _tfkit("prepare", str(work / "train.jsonl"), "--tokenizer", str(work / "tok.json"), "--out", str(work / "train.bin"),
           env=env)
    t0 = time.perf_counter()
    _tfkit("train", "--preset", "nano", "--train-data", str(work / "train.bin"), "--tokenizer", str(work / "tok.json"),
           "--name", "add", "--max-time", f"{int(a.minutes * 60)}s", "--set", "model.context_length=64",
           "--set", "data.loss_on=assistant", env=env)
    train_s = time.perf_counter() - t0

    os.environ["TFKIT_HOME"] = env["TFKIT_HOME"]
    from tfkit.cli.chat import Chat
    from tfkit.train.setup import load_run, run_runtime

    runtime = run_runtime("add")
    loaded = load_run("add", runtime.device, attention=runtime.attention)
    chat = Chat(loaded, runtime, None, dict(max_new_tokens=24, temperature=0.0, top_k=None, top_p=None, seed=0))
    shaped = stopped = right = 0
    examples = []
    for x, y in held:
        chat.reset()
        reply, _, why = chat.answer(f"What is {x} plus {y}?", stream=False)
        m = re.fullmatch(rf"{x} plus {y} is (\d+)\.", reply)
        shaped += m is not None
        stopped += why == "end_of_turn"
        right += m is not None and int(m.group(1)) == x + y
        if len(examples) < 5:
            examples.append({"question": f"What is {x} plus {y}?", "reply": reply, "stopped": why})
    info = json.loads((work / "home/runs/add/run.json").read_text())
    lines = [json.loads(s) for s in (work / "home/runs/add/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r.get("kind") == "step"]
    print(json.dumps({
        "train_conversations": len(train), "held_out_questions": len(held), "train_seconds": round(train_s, 1),
        "steps": info.get("step"), "final_train_loss": steps[-1]["loss"] if steps else None,
        "val_loss_assistant_tokens": info.get("val_loss"), "loss_tokens_per_step": steps[-1]["stats"].get("loss_tokens"),
        "answers_in_format": shaped, "stopped_at_end_of_turn": stopped, "correct": right, "examples": examples,
    }, indent=2))


if __name__ == "__main__":
    main()
