"""`tfkit train`: build the config, pick hardware settings, train with a live dashboard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from tfkit.cli.options import ConfigFileOpt, JsonOpt, PresetOpt, SetOpt
from tfkit.cli.output import info, print_json, progress_bar, warn


def _summary(run_dir: Path, finished, extra: dict) -> dict:
    return {"run": run_dir.name, "path": str(run_dir), "step": finished.step, "reason": finished.reason,
            "elapsed_s": round(finished.elapsed_s, 2), "tokens_seen": finished.tokens_seen,
            "val_loss": finished.val_loss, "val_bits_per_byte": finished.val_bits_per_byte,
            "best_val_loss": finished.best_val_loss, **extra}


def report_finished(run_dir: Path, finished, json_out: bool, extra: dict) -> None:
    """Final lines of `train`/`resume`: the run, its val loss and bpb, and what to type next."""
    from tfkit.train.events import _fmt_time

    name = run_dir.name
    val = f"val loss {finished.val_loss:.4f}" if finished.val_loss is not None else "no evaluation"
    bpb = f", {finished.val_bits_per_byte:.4f} bits/byte" if finished.val_bits_per_byte is not None else ""
    info(f"[bold]run {name}[/bold]: step {finished.step} ({finished.reason}) in {_fmt_time(finished.elapsed_s)}; {val}{bpb}")
    info(f"saved in {run_dir}")
    info(f"try it: tfkit generate {name} --prompt \"ROMEO:\"")
    if json_out:
        print_json(_summary(run_dir, finished, extra))
    if finished.reason in ("sigterm", "interrupted"):
        info(f"stopped early; continue with: tfkit resume {name}")
        raise typer.Exit(143 if finished.reason == "sigterm" else 130)


def _keys_given(config_file: Optional[Path], sets: list[str]) -> set[str]:
    """Dotted keys a config file or ``--set`` flags set explicitly."""
    keys = {item.split("=", 1)[0].strip() for item in sets}
    if config_file is not None and config_file.is_file():
        import yaml

        def walk(d, prefix=""):
            for k, v in (d or {}).items() if isinstance(d, dict) else ():
                keys.add(prefix + str(k))
                walk(v, f"{prefix}{k}.")

        try:
            walk(yaml.safe_load(config_file.read_text()))
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            pass  # config.load reports it
    return keys


def _init_source(init_from: str, config_file: Optional[Path], sets: list[str], may_import: bool) -> tuple[str, list[str]]:
    """The ``--init-from`` run (a Hugging Face folder or cached repo id is imported as a run first),
    and the ``--set`` items that give the new run the source's model shape and tokenizer wherever
    the config file and ``--set`` do not say otherwise (e.g. ``--set model.arch=dtf``)."""
    from tfkit.interop.hf_runs import init_source, source_model_sets

    run_dir = init_source(init_from, allow_import=may_import, on_status=info)
    given = _keys_given(config_file, sets)
    out = [s for s in source_model_sets(run_dir) if s.split("=", 1)[0] not in given]
    if "data.tokenizer" not in given and (run_dir / "tokenizer.json").is_file():
        out.append(f"data.tokenizer={run_dir / 'tokenizer.json'}")
    return str(run_dir), out


def _init_checkpoint(init_from: str, cfg) -> Path:
    """The verified latest checkpoint of the ``--init-from`` run, after checking it shares this run's tokenizer.

    Raises:
        CheckpointError: unknown run or no complete checkpoint.
        ConfigError: the two runs' tokenizers differ (the embedding rows would mean other tokens).
    """
    from tfkit.data.tokenizer import Tokenizer
    from tfkit.errors import ConfigError
    from tfkit.train import checkpoint as ckpt_mod
    from tfkit.train.runs import resolve_run

    src_dir = resolve_run(init_from)
    ckpt = ckpt_mod.find_checkpoint(src_dir, "latest", on_warning=warn)
    src_tok = src_dir / "tokenizer.json"
    if src_tok.is_file() and cfg.data.tokenizer:
        if Tokenizer.load(src_tok).hash != Tokenizer.load(Path(cfg.data.tokenizer)).hash:
            raise ConfigError(f"--init-from run `{src_dir.name}` was trained with another tokenizer than this run's data",
                              f"prepare the data with `{src_tok}` (`tfkit prepare --tokenizer {src_tok} ...`)")
    info(f"init: weights from `{src_dir.name}` checkpoint `{ckpt.name}`")
    return ckpt


def launch_torchrun(nproc: int, argv: list[str]) -> None:
    """Run this command line (without ``--nproc-per-node``) on ``nproc`` processes through torchrun's
    agent in this process, and exit with the ranks' code (143 after a SIGTERM, as in one process)."""
    from tfkit.hardware import torchrun_command
    from tfkit.train.distributed import launch

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            args.append(a)
    info(f"starting: {torchrun_command(nproc, ' '.join(args))}")
    raise typer.Exit(launch(nproc, args))


def run_job(job, dist, json_out: bool, extra: dict) -> None:
    """Train ``job`` (every rank), show the dashboard and the summary on rank 0, and leave the
    process group; ranks other than 0 exit with rank 0's code, silently."""
    from contextlib import nullcontext

    from tfkit.cli.dashboard import Dashboard
    from tfkit.train.loop import run

    try:
        with (Dashboard() if dist.is_main else nullcontext(lambda e: None)) as sink:
            finished = run(job, on_event=sink)
    finally:
        dist.close()
    if dist.is_main:
        report_finished(job.run_dir, finished, json_out, extra)
    elif finished.reason in ("sigterm", "interrupted"):
        raise typer.Exit(143 if finished.reason == "sigterm" else 130)


NprocOpt = Annotated[Optional[int], typer.Option(
    "--nproc-per-node", min=1, help="Train on N processes of this machine (one per GPU) through torchrun; "
    "the same as `torchrun --standalone --nproc-per-node N -m tfkit train ...`. For several machines run "
    "torchrun yourself (see the README).")]


def command(
    config_file: ConfigFileOpt = None,
    preset: PresetOpt = None,
    train_data: Annotated[Optional[Path], typer.Option("--train-data", help="Prepared token file to train on (`tfkit prepare`). Default: bundled Shakespeare.")] = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="Prepared token file for validation. Default: hold out the end of the train data.")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="tokenizer.json that made the token files (needed for bits/byte and `generate`).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name (folder under the data dir). Default: ARCH-PRESET-TIMESTAMP.")] = None,
    overrides: SetOpt = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Optimizer steps to train (sets train.max_steps; without --max-time it also lifts the preset's time budget).")] = None,
    max_time: Annotated[Optional[str], typer.Option("--max-time", help="Wall-clock budget such as 90s, 5m, 2h (sets train.max_time).")] = None,
    init_from: Annotated[Optional[str], typer.Option("--init-from", metavar="RUN|HF", help="Start from another run's latest weights, or a Hugging Face model folder / cached repo id (imported as a run first): the new run takes its model shape and tokenizer unless --set says otherwise; tensors that match by name and shape are loaded, the rest start fresh (e.g. turn a llama into a dtf model).")] = None,
    nproc_per_node: NprocOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a language model, with a live dashboard.

    With no data options it trains on the bundled complete works of Shakespeare: a BPE tokenizer
    and the token files are made once and cached. `--preset auto` picks the model size, precision
    and attention kernel for this machine and says why.

    Examples:

      tfkit train --preset auto

      tfkit train --preset nano --train-data corpus.train.bin --val-data corpus.val.bin --tokenizer tokenizer.json --max-steps 500

      tfkit train -c tfkit.yaml --set optim.lr=3e-4 --name my-run

      tfkit train --preset nano --set model.arch=mod --init-from my-llama-run

      tfkit train --init-from Qwen/Qwen2.5-0.5B --set model.arch=dtf --train-data qwen.bin --set model.context_length=512

      tfkit train --preset small --nproc-per-node 8
    """
    import sys

    from tfkit import config as config_mod
    from tfkit import hardware
    from tfkit.train import distributed

    world = distributed.env_world_size()
    if nproc_per_node and nproc_per_node > 1 and world == 1:
        launch_torchrun(nproc_per_node, sys.argv[1:])
    sets = list(overrides or [])
    for key, value in (("data.train", train_data), ("data.val", val_data), ("data.tokenizer", tokenizer),
                       ("train.max_steps", max_steps), ("train.max_time", max_time)):
        if value is not None:
            sets.append(f"{key}={value}")
    if max_steps is not None and max_time is None:
        sets.append("train.max_time=")  # an explicit step count replaces a preset's wall-clock budget
    if init_from:
        init_from, source_sets = _init_source(init_from, config_file, sets, may_import=world == 1)
        sets = source_sets + sets

    hw = hardware.detect()
    chosen = preset
    if preset == "auto":
        base = config_mod.load(config_file, None, sets)
        runtime = hardware.resolve(base.system, hw)
        choice = hardware.choose_preset(hw, runtime)
        chosen = choice.name
        info(f"preset: [bold]{choice.name}[/bold] - auto: {choice.reason}")
        given = _keys_given(config_file, sets)  # the file and --set win over what auto measured
        sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in choice.overrides().items() if k not in given] + sets
    cfg = config_mod.load(config_file, chosen, sets)
    runtime = hardware.resolve(cfg.system, hw)
    runtime = hardware.resolve_distributed(cfg, hw, runtime, world, int(os.environ.get("LOCAL_RANK", "0")))
    for key in ("device", "precision", "attention", "compile") + (("distributed",) if world > 1 else ()):
        info(f"{key}: [bold]{getattr(runtime, key)}[/bold] - {runtime.reasons.get(key, '')}")
    dist = distributed.init(runtime.device_type)

    from tfkit.train.setup import default_run_name, new_run, resolve_data

    def make_run():  # rank 0 alone: the corpus cache, the run folder and its name
        data_cfg = cfg
        if data_cfg.data.train is None:
            info("data: bundled Shakespeare (complete works); tokenizer and token files are cached after the first run")
        with progress_bar("preparing the bundled corpus", None) as advance:
            data_cfg = resolve_data(data_cfg, on_status=lambda s: info(s), on_progress=advance)
        if not data_cfg.data.tokenizer:
            warn("no tokenizer given: bits per byte and `tfkit generate` need one (`--tokenizer tokenizer.json`)")
        init_ckpt = _init_checkpoint(init_from, data_cfg) if init_from else None
        return data_cfg, new_run(data_cfg, name or default_run_name(data_cfg, chosen), chosen), init_ckpt

    try:
        cfg, run_dir, init_ckpt = dist.on_main(make_run)
    except BaseException:
        dist.close()
        raise

    from contextlib import nullcontext

    from tfkit.train.loop import TrainJob
    from tfkit.train.runs import run_lock

    job = TrainJob(cfg=cfg, runtime=runtime, run_dir=run_dir, peak_flops=hardware.peak_flops(hw, runtime),
                   init_from=init_ckpt, gpu_names=tuple(g.name for g in hw.gpus), dist=dist)
    with run_lock(run_dir) if dist.is_main else nullcontext():
        run_job(job, dist, json_out, {"preset": chosen, "device": runtime.device, "precision": runtime.precision,
                                      "world_size": runtime.world_size, "distributed": runtime.distributed})
