"""Kill `tfkit train` at random moments, resume it, and check the final weights byte for byte.

Trains a tiny model with a checkpoint every step (so many kills land inside a save) and
``train.keep_last=1`` (no older checkpoint to fall back on when the newest is lost) once without
interruption, then runs ``--trials`` copies of the same run and stops each at a random moment:

- even trials: SIGKILL (a crash, the OOM killer, a lost node);
- odd trials: a scheduler's preemption: SIGTERM, then SIGKILL after a random grace of 0-1.5 s (a
  clean exit takes about 0.5 s here, so some end with 143 and some are killed while saving or exiting);
- about a third of the trials are killed once more while resuming (repeated preemption);
- in half of the trials of each kind the first stop is placed inside a checkpoint write (before its
  files, after them, or after the manifest, through ``TFKIT_FAULT``), the rest at a random moment.

Each trial is then resumed to the end with ``tfkit resume`` and its final ``model.safetensors`` is
compared with the uninterrupted run's. Printed: bit-exact / trials, lost runs (no resume, an error,
a traceback), diverged runs (different bytes), how many kills landed inside a checkpoint write, the
exit codes of the interrupted processes and the steps redone after each kill.

    python benchmarks/fault_campaign.py                 # 100 trials, about 8 minutes on 2 cores
    python benchmarks/fault_campaign.py --trials 10 --json

Target (issue 7): 100/100 bit-exact, 0 lost, on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SETS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.context_length=32",
        "train.batch_size=8", "train.eval_interval=10", "train.eval_steps=2", "train.ckpt_interval=1",
        "train.keep_last=1", "train.log_interval=5", "optim.warmup_steps=5"]


def _train_cmd(data: Path, name: str, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "tfkit", "train", "--train-data", str(data), "--name", name, "--max-steps", str(steps)]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TFKIT_FAULT"}
    env["TFKIT_HOME"] = str(home)
    return env


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _final(home: Path, name: str, steps: int) -> Path:
    return home / "runs" / name / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"


def _progress(run_dir: Path) -> tuple[int, int]:
    """(training sessions started, steps logged since the last start) from metrics.jsonl."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return 0, 0
    starts = text.count('"kind": "start"')
    return starts, text[text.rfind('"kind": "start"'):].count('"kind": "step"') if starts else 0


def _in_save(run_dir: Path) -> bool:
    """Whether a checkpoint write was under way when the process died (a .tmp or .old folder)."""
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.endswith((".tmp", ".old")) for p in root.iterdir())


def _steps_logged(run_dir: Path) -> list[int]:
    steps = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return steps
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line a killed process left half-written
            continue
        if row.get("kind") == "step":
            steps.append(row["step"])
    return steps


SAVE_POINTS = ("save.begin", "save.files", "save.manifest")
"""Moments inside a checkpoint write (tfkit/train/faults.py): before any file, after the data files,
after the manifest (just before the rename)."""


def _interrupt(cmd: list[str], env: dict, run_dir: Path, rng: random.Random, steps: int, step_s: float,
               preempt: bool, at_point: bool = False) -> dict:
    """Start ``cmd``; once its training has logged a random number of steps (0 … ``steps`` - 1), wait
    a random part of a step (``step_s`` s: a step and its checkpoint) and stop it.

    With ``at_point``, the stop lands inside the checkpoint write of a random step instead, at one of
    :data:`SAVE_POINTS` (``TFKIT_FAULT``): the process SIGKILLs itself there, or for a preemption
    sends itself SIGTERM there and is SIGKILLed after the grace.
    """
    t0 = time.perf_counter()
    before = _progress(run_dir)[0]
    target = rng.randrange(steps)
    point = ""
    if at_point:
        point = rng.choice(SAVE_POINTS)
        env = {**env, "TFKIT_FAULT": f"{point}@{target + 1}={'term' if preempt else 'kill'}"}
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe would block the process's exit
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    while proc.poll() is None and time.perf_counter() - t0 < 120:
        started, done = _progress(run_dir)
        if started > before and done >= target + (1 if at_point else 0):
            break
        time.sleep(0.002)
    if not (at_point and not preempt):
        time.sleep(rng.uniform(0.0, step_s))
    how = ("preempt" if preempt else "kill") + (f" at {point}" if point else "")
    if at_point and not preempt:
        proc.wait()  # it kills itself at the point
    elif proc.poll() is None:
        if preempt:
            if not at_point:  # else it sent itself SIGTERM inside the write
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=rng.uniform(0.0, 1.5))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
    else:
        how = "finished first"
    proc.wait()
    if at_point and not preempt and proc.returncode != -signal.SIGKILL:
        how = "finished first"  # the point was never reached
    log.seek(0)
    err = log.read()
    log.close()
    return {"how": how, "code": proc.returncode, "in_save": _in_save(run_dir), "traceback": "Traceback" in err,
            "logged_steps": len(_steps_logged(run_dir))}


def trial(i: int, args, data: Path, home: Path, ref_sha: str, step_s: float) -> dict:
    rng = random.Random(args.seed * 100_003 + i)
    name = f"trial-{i:03d}"
    run_dir = home / "runs" / name
    env = _env(home)
    stops = [_interrupt(_train_cmd(data, name, args.steps), env, run_dir, rng, args.steps, step_s, preempt=i % 2 == 1,
                        at_point=i % 4 >= 2)]
    if rng.random() < 1 / 3 and (run_dir / "run.json").is_file():  # preempted again while resuming
        left = args.steps - max(_steps_logged(run_dir), default=0)
        stops.append(_interrupt([sys.executable, "-m", "tfkit", "resume", name], env, run_dir, rng, max(1, left), step_s,
                                preempt=rng.random() < 0.5))
    out = {"trial": i, "stops": stops}
    if not (run_dir / "run.json").is_file():
        return {**out, "outcome": "lost", "why": "the run folder was never created"}
    r = subprocess.run([sys.executable, "-m", "tfkit", "resume", name], env=env, capture_output=True, text=True)
    finished_already = r.returncode == 2 and "already finished" in r.stderr
    if (r.returncode != 0 and not finished_already) or "Traceback" in r.stderr:
        return {**out, "outcome": "lost", "why": f"resume exit {r.returncode}: {r.stderr.strip().splitlines()[-2:]}"}
    final = _final(home, name, args.steps)
    if not final.is_file():
        return {**out, "outcome": "lost", "why": "no final checkpoint"}
    logged = _steps_logged(run_dir)
    redone = len(logged) - len(set(logged))
    outcome = "bit-exact" if _sha(final) == ref_sha else "diverged"
    return {**out, "outcome": outcome, "steps_redone": redone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100, help="interrupted runs (default 100)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    ap.add_argument("--workers", type=int, default=2, help="trials run at once (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed) for inspection")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tfkit-faults-"))
    home = tmp / "home"
    data = tmp / "dummy.bin"
    subprocess.run([sys.executable, "-m", "tfkit", "dummy-data", "--out", str(data), "--tokens", "200000",
                    "--vocab-size", "512"], env=_env(home), check=True, capture_output=True)
    t0 = time.perf_counter()
    r = subprocess.run(_train_cmd(data, "reference", args.steps), env=_env(home), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"reference run failed:\n{r.stderr}")
    rows = [json.loads(line) for line in (home / "runs/reference/metrics.jsonl").read_text().splitlines()]
    train_s = rows[-1]["time"] - next(row["time"] for row in rows if row["kind"] == "start")
    ref_sha = _sha(_final(home, "reference", args.steps))
    print(f"reference: {args.steps} steps, a checkpoint every step, {train_s:.2f} s of training "
          f"({time.perf_counter() - t0:.1f} s with start-up); final weights sha256 {ref_sha[:16]}", file=sys.stderr)

    results = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        step_s = 2 * train_s / args.steps  # a step and its checkpoint, with room for a busy machine
        futures = [pool.submit(trial, i, args, data, home, ref_sha, step_s) for i in range(args.trials)]
        for n, fut in enumerate(futures, 1):
            res = fut.result()
            results.append(res)
            stops = ", ".join(f"{s['how']} after {s['logged_steps']} steps -> exit {s['code']}"
                              f"{' (in a save)' if s['in_save'] else ''}" for s in res["stops"])
            print(f"[{n}/{args.trials}] {res['outcome']:9} {stops}" + (f" ({res['why']})" if "why" in res else ""),
                  file=sys.stderr)
    elapsed = time.perf_counter() - t0

    stops = [s for r in results for s in r["stops"]]
    codes: dict[str, int] = {}
    for s in stops:
        codes[str(s["code"])] = codes.get(str(s["code"]), 0) + 1
    redone = [r["steps_redone"] for r in results if "steps_redone" in r]
    summary = {
        "trials": args.trials,
        "bit_exact": sum(r["outcome"] == "bit-exact" for r in results),
        "lost": sum(r["outcome"] == "lost" for r in results),
        "diverged": sum(r["outcome"] == "diverged" for r in results),
        "interruptions": len(stops),
        "sigkill": sum(s["how"].startswith("kill") for s in stops),
        "preemptions": sum(s["how"].startswith("preempt") for s in stops),
        "at_save_points": sum(" at " in s["how"] for s in stops),
        "finished_before_the_signal": sum(s["how"] == "finished first" for s in stops),
        "landed_in_a_save": sum(s["in_save"] for s in stops),
        "tracebacks": sum(s["traceback"] for s in stops),
        "exit_codes": codes,
        "median_steps_redone": statistics.median(redone) if redone else None,
        "max_steps_redone": max(redone) if redone else None,
        "seconds": round(elapsed, 1),
        "failures": [r for r in results if r["outcome"] != "bit-exact"],
    }
    if args.keep:
        print(f"run folders kept in {home / 'runs'}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"bit-exact: {summary['bit_exact']}/{args.trials}  lost: {summary['lost']}  diverged: {summary['diverged']}")
        print(f"interruptions: {summary['interruptions']} ({summary['sigkill']} SIGKILL, {summary['preemptions']} "
              f"SIGTERM+grace, {summary['finished_before_the_signal']} finished first); "
              f"{summary['at_save_points']} placed inside a checkpoint write, "
              f"{summary['landed_in_a_save']} left a write unfinished")
        print(f"exit codes of the interrupted processes: {codes}; tracebacks: {summary['tracebacks']}")
        print(f"steps redone per trial: median {summary['median_steps_redone']}, max {summary['max_steps_redone']}; "
              f"{elapsed:.0f} s in all")
        for f in summary["failures"]:
            print(f"  trial {f['trial']}: {f['outcome']} {f.get('why', '')}")


if __name__ == "__main__":
    main()
