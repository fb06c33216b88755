"""`tfkit resume`: continue a run from its latest complete checkpoint."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt, RunArg, SetOpt
from tfkit.cli.output import info, warn
from tfkit.cli.train import NprocOpt


def command(
    run: RunArg,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="New total number of optimizer steps (the schedule is stretched to it).")] = None,
    max_time: Annotated[Optional[str], typer.Option("--max-time", help="Train for this much more wall-clock time (90s, 5m, 2h); the schedule is refitted.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Checkpoint to resume from: latest (the newest written), best (the full checkpoint at the best evaluation's step) or a step number. Later checkpoints then belong to an abandoned line.")] = "latest",
    overrides: SetOpt = None,
    allow_changes: Annotated[bool, typer.Option("--allow-changes", help="Continue even though the config, the token files or the tokenizer changed on disk since the checkpoint.")] = False,
    nproc_per_node: NprocOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Continue a run from its latest complete checkpoint.

    Model, optimizer, learning-rate schedule, step, RNG states and the data position are restored,
    so an interrupted run continues exactly as if it had not stopped (bit-exact on CPU in fp32).

    Resume refuses a run whose config, token files or tokenizer changed on disk since the
    checkpoint, naming what changed. Change settings on purpose with `--set` (printed and kept in
    the run's history), or accept what changed with `--allow-changes`.

    Examples:

      tfkit resume llama-nano-20261121-101500

      tfkit resume my-run --max-steps 4000

      tfkit resume my-run --set optim.lr=3e-4

      tfkit resume my-run --nproc-per-node 2
    """
    import os
    import sys
    from contextlib import nullcontext

    from tfkit import hardware
    from tfkit.cli.train import launch_torchrun, run_job
    from tfkit.train import distributed, runs
    from tfkit.train.loop import TrainJob
    from tfkit.train.resume import describe, plan_resume
    from tfkit.train.setup import load_run_config

    world = distributed.env_world_size()
    if nproc_per_node and nproc_per_node > 1 and world == 1:
        launch_torchrun(nproc_per_node, sys.argv[1:])
    run_dir = runs.resolve_run(run)
    hw = hardware.detect()
    if world > 1:  # every rank needs the backend (from system.device) before rank 0 plans the resume
        first = hardware.resolve(load_run_config(run_dir, overrides).system, hw)
        dist = distributed.init(first.device_type)
    else:
        dist = distributed.Dist()

    def plan_it():
        plan = plan_resume(run_dir, checkpoint, overrides, max_steps, max_time, allow_changes, on_warning=warn)
        for note in plan.notes:
            info(note)
        if plan.changes:
            info(f"changing on purpose: {describe(plan.changes)}")
        if plan.allowed:
            warn(f"continuing despite changes (--allow-changes): {describe(plan.allowed)}")
        runs.append_history(run_dir, {
            "event": "resume", "from_step": plan.step, "checkpoint": plan.checkpoint.name if plan.checkpoint else None,
            "max_steps": max_steps, "max_time": max_time, "world_size": world,
            "changes": {k: list(v) for k, v in plan.changes.items()},
            "allowed_changes": {k: list(v) for k, v in plan.allowed.items()}})
        return plan

    with runs.run_lock(run_dir) if dist.is_main else nullcontext():
        try:
            plan = dist.on_main(plan_it)
            runtime = hardware.resolve(plan.cfg.system, hw)
            runtime = hardware.resolve_distributed(plan.cfg, hw, runtime, world, int(os.environ.get("LOCAL_RANK", "0")))
        except BaseException:
            dist.close()
            raise
        if world > 1:
            info(f"distributed: [bold]{runtime.distributed}[/bold] - {runtime.reasons['distributed']}")
        job = TrainJob(cfg=plan.cfg, runtime=runtime, run_dir=run_dir, resume=plan.checkpoint is not None,
                       checkpoint=plan.checkpoint or "latest", time_budget_s=plan.time_budget_s,
                       refit_schedule=plan.refit_schedule, peak_flops=hardware.peak_flops(hw, runtime),
                       reset_loader=plan.reset_loader, write_config=plan.config_changed,
                       fingerprints=plan.fingerprints if dist.is_main else None,
                       gpu_names=tuple(g.name for g in hw.gpus), dist=dist)
        run_job(job, dist, json_out, {"device": runtime.device, "precision": runtime.precision,
                                      "world_size": runtime.world_size, "distributed": runtime.distributed})
