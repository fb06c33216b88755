"""`tfkit resume`: continue a run from its latest complete checkpoint."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt, RunArg
from tfkit.cli.output import info


def command(
    run: RunArg,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="New total number of optimizer steps (the schedule is stretched to it).")] = None,
    max_time: Annotated[Optional[str], typer.Option("--max-time", help="Train for this much more wall-clock time (90s, 5m, 2h); the schedule is refitted.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Checkpoint to resume from: latest, best or a step number.")] = "latest",
    json_out: JsonOpt = False,
) -> None:
    """Continue a run from its latest complete checkpoint.

    Model, optimizer, learning-rate schedule, step, RNG states and the data position are restored,
    so an interrupted run continues exactly as if it had not stopped.

    Examples:

      tfkit resume llama-nano-20261121-101500

      tfkit resume my-run --max-steps 4000
    """
    from tfkit import hardware
    from tfkit.cli.dashboard import Dashboard
    from tfkit.cli.train import report_finished
    from tfkit.config import parse_duration
    from tfkit.errors import ConfigError
    from tfkit.train import checkpoint as ckpt_mod
    from tfkit.train.loop import TrainJob, run as run_loop
    from tfkit.train.setup import load_run_config

    run_dir = ckpt_mod.resolve_run(run)
    sets = [f"train.max_steps={max_steps}"] if max_steps else []
    if max_steps and not max_time:
        sets.append("train.max_time=")  # a step target replaces the run's original time budget
    cfg = load_run_config(run_dir, sets)
    try:
        budget = parse_duration(max_time)
    except ValueError as exc:
        raise ConfigError(f"--max-time: {exc}", "write e.g. `--max-time 5m`") from None
    ckpt = ckpt_mod.find_checkpoint(run_dir, checkpoint, on_warning=lambda s: info(f"warning: {s}"))
    step = int(ckpt_mod.load_state(ckpt).get("step", 0))
    if max_steps is not None and max_steps <= step:
        raise ConfigError(f"--max-steps {max_steps} is not beyond the checkpoint's step {step}",
                          f"give a larger number, e.g. `--max-steps {step * 2}`")
    if max_steps is None and budget is None and (step >= cfg.train.max_steps
                                                  or ckpt_mod.read_run_info(run_dir).get("status") == "finished"):
        raise ConfigError(f"run `{run_dir.name}` already finished (step {step}, its step or time budget is spent)",
                          f"train further with `tfkit resume {run_dir.name} --max-steps {max(step * 2, 10)}` or `--max-time 5m`")
    hw = hardware.detect()
    runtime = hardware.resolve(cfg.system, hw)
    job = TrainJob(cfg=cfg, runtime=runtime, run_dir=run_dir, resume=True, checkpoint=ckpt,
                   time_budget_s=budget, refit_schedule=bool(max_steps or budget),
                   peak_flops=hardware.peak_flops(hw, runtime))
    with ckpt_mod.run_lock(run_dir), Dashboard() as dash:
        finished = run_loop(job, on_event=dash)
    report_finished(run_dir, finished, json_out, {"device": runtime.device, "precision": runtime.precision})
