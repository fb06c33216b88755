"""The training loop: build model, optimizer and data; step; evaluate; checkpoint; emit events.

The loop never branches on the model variant: it minimises ``output.loss`` and logs whatever
``output.parts`` and ``output.stats`` hold. It is deterministic for a given config and seed on CPU
(fp32), and a resumed run continues bit-exactly: weights, AdamW moments, grad scaler, RNG states,
step, schedule length and the data loader's position are all in the checkpoint.

Signals: SIGTERM and the first Ctrl-C only set a flag (no I/O in the handler, Lightning#21406). The
loop stops between steps, cuts a running evaluation short (it runs first on resume), and writes a
checkpoint; checkpoint writes are never interrupted, not even by a second Ctrl-C.

Guards: a non-finite loss, gradient norm, validation loss or weight stops the run before anything
holding it is written (``run.json`` status ``diverged``); running out of memory stops it with
advice (status ``failed``); earlier checkpoints are never touched by either.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tfkit.config import RunConfig
from tfkit.data.loader import BatchLoader, eval_batches, hold_out
from tfkit.data.tokenfile import TokenFile
from tfkit.errors import DataError, ResourceError, TfkitError
from tfkit.hardware import Runtime
from tfkit.models import build_model
from tfkit.train import checkpoint as ckpt_mod
from tfkit.train import faults, runs
from tfkit.train.evaluate import autocast_context, evaluate
from tfkit.train.events import (CheckpointSaved, EvalDone, Message, RunFinished, RunStarted, ScheduleFitted, StepDone,
                                format_event, to_record)
from tfkit.train.optim import build_optimizer, lr_at, set_lr


class NonFiniteLoss(TfkitError):
    """The loss or gradient norm became NaN/Inf; no checkpoint holding it was written."""


@dataclass
class TrainJob:
    """What :func:`run` needs besides the config.

    Attributes:
        cfg: the resolved config (``model.vocab_size`` and ``data.train`` set).
        runtime: device, precision, attention backend and compile choice from ``tfkit.hardware``.
        run_dir: the run folder (``config.yaml`` and ``tokenizer.json`` already written).
        resume: continue from a checkpoint of ``run_dir``: ``checkpoint`` is latest | best | a step,
            or the folder of a checkpoint the caller already found and verified.
        time_budget_s: wall-clock seconds this invocation may train; ``None`` = no limit.
        refit_schedule: fit the schedule length to ``time_budget_s`` again (resume with a new budget).
        peak_flops: the device's peak FLOP/s at this precision, for MFU; ``None`` = unknown.
        init_from: a checkpoint folder of another run whose weights start this (new) run where
            names and shapes match (``tfkit train --init-from``); ignored when resuming.
        reset_loader: when resuming on training data that changed (deliberately), start its data
            order afresh instead of restoring the checkpoint's position in the old data.
        write_config: the run's ``config.yaml`` differs from ``cfg`` (``resume --set``): write
            ``cfg`` there once the checkpoint has loaded, and put the old file back if the session
            fails before its first checkpoint.
        fingerprints: the data fingerprints, when the caller measured them already.
        gpu_names: names of the visible CUDA GPUs, for ``env.json``.
    """

    cfg: RunConfig
    runtime: Runtime
    run_dir: Path
    resume: bool = False
    checkpoint: str | Path = "latest"
    time_budget_s: Optional[float] = None
    refit_schedule: bool = False
    peak_flops: Optional[float] = None
    init_from: Optional[Path] = None
    reset_loader: bool = False
    write_config: bool = False
    fingerprints: Optional[dict[str, Any]] = None
    gpu_names: tuple[str, ...] = ()


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps and evaluation batches (no I/O in the
    handler). A second Ctrl-C stops at once, except inside :meth:`deferred` (checkpoint writes),
    where it is held until the write is complete."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._old: dict[int, object] = {}
        self._defer = 0
        self._interrupt_held = False

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            if self._defer:
                self._interrupt_held = True
                return
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum

    @contextlib.contextmanager
    def deferred(self):
        """Hold a second Ctrl-C until the block ends (then raise it)."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if not self._defer and self._interrupt_held:
            self._interrupt_held = False
            raise KeyboardInterrupt

    @property
    def reason(self) -> str:
        return "sigterm" if self.signal == signal.SIGTERM else "interrupted"

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _EvalCut(Exception):
    """A signal arrived during an evaluation."""


_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
             "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA, MPS or host out-of-memory error (torch raises several kinds)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def out_of_memory_advice(cfg: RunConfig, device: str, step: int, run_name: str) -> ResourceError:
    """The error for running out of memory at optimizer step ``step``, with concrete smaller settings."""
    t, m = cfg.train, cfg.model
    tips = []
    if t.batch_size > 1:
        tips.append(f"`--set train.batch_size={t.batch_size // 2} --set train.grad_accum_steps={t.grad_accum_steps * 2}` "
                    "(the same tokens per step)")
    if not cfg.system.grad_checkpointing:
        tips.append("`--set system.grad_checkpointing=true`")
    tips.append(f"a smaller preset or `--set model.context_length={max(2, m.context_length // 2)}`")
    return ResourceError(f"out of memory on {device} at step {step} (micro-batch {t.batch_size} x "
                         f"{m.context_length} tokens, {t.grad_accum_steps} per step); earlier checkpoints are intact",
                         "try " + "; or ".join(tips) + f"; continue with `tfkit resume {run_name} --set ...`, "
                         "or start over with `tfkit train ... --set ...`")


def _memory_bytes(device: str) -> Optional[int]:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(torch.mps.current_allocated_memory())
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def _open_data(cfg: RunConfig, vocab_size: int):
    train_file = TokenFile.open(cfg.data.train)
    if train_file.header.vocab_size > vocab_size:
        raise DataError(f"`{cfg.data.train}` was made with vocab_size {train_file.header.vocab_size}, "
                        f"above model.vocab_size {vocab_size}",
                        "drop `model.vocab_size` to follow the tokenizer, or re-prepare the data")
    train_file.check_ids(vocab_size)
    if cfg.data.val:
        val_file = TokenFile.open(cfg.data.val)
        val_file.check_ids(vocab_size)
        if val_file.header.tokenizer_hash != train_file.header.tokenizer_hash:
            raise DataError(f"`{cfg.data.val}` and `{cfg.data.train}` were made by different tokenizers",
                            "prepare both with the same tokenizer.json")
        return train_file.tokens, val_file.tokens
    return hold_out(train_file.tokens, cfg.data.val_fraction)


def _byte_lengths(run_dir: Path) -> Optional[torch.Tensor]:
    path = run_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tfkit.data.tokenizer import Tokenizer

    return torch.from_numpy(Tokenizer.load(path).byte_lengths().astype("int64"))


def describe_init(report: ckpt_mod.InitReport, source: str) -> list[str]:
    """Lines that say which tensors ``--init-from`` loaded and which start fresh."""
    lines = [f"init from `{source}`: loaded {len(report.loaded)} tensors ({report.loaded_params:,} params) "
             f"matching by name and shape"]
    fresh = report.new + report.mismatched
    if fresh:
        lines.append(f"new (fresh init), {len(fresh)} tensors ({report.new_params:,} params): " + ", ".join(fresh))
    else:
        lines.append("new (fresh init): none")
    if report.unused:
        lines.append(f"not used from `{source}`, {len(report.unused)} tensors: " + ", ".join(report.unused))
    return lines


class _Curriculum:
    """The data loader and model settings of the ``train.curriculum`` phase in force at each step.

    Each phase trains on windows of its own ``context_length`` from a loader of its own (seeded
    ``seed + phase + 1``; the steps before the first phase use the model's context and ``seed``),
    so a resumed run rebuilds exactly the loader it checkpointed.
    """

    def __init__(self, cfg: RunConfig, tokens) -> None:
        self.cfg, self.tokens = cfg, tokens
        self.index: Optional[int] = None
        self.loader: Optional[BatchLoader] = None
        self.context_length = cfg.model.context_length
        self.overrides: dict[str, float] = {}

    def at(self, step: int) -> bool:
        """Switch to the phase of optimizer step ``step``; True when it changed."""
        index, phase = self.cfg.train.phase_at(step)
        if index == self.index:
            return False
        t = (phase.context_length if phase and phase.context_length else None) or self.cfg.model.context_length
        self.index, self.context_length = index, t
        self.overrides = phase.model_overrides() if phase else {}
        self.loader = BatchLoader(self.tokens, self.cfg.train.batch_size, t, seed=self.cfg.system.seed + index + 1)
        return True

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "phase": self.index}

    def load_state_dict(self, state: dict, step: int) -> None:
        self.at(step)
        if state.get("phase", -1) == self.index:  # else the checkpoint ended a phase: the next one starts fresh
            self.loader.load_state_dict(state)


def run(job: TrainJob, on_event: Callable[[object], None] = lambda e: None) -> RunFinished:
    """Train (or resume) the run described by ``job``, emitting events to ``on_event``.

    Every event also goes to ``run_dir/metrics.jsonl`` (JSON lines) and ``run_dir/train.log``.
    Call it with the run lock held (:func:`tfkit.train.runs.run_lock`).

    Raises:
        DataError: token files missing, malformed, too short, or with ids outside the vocabulary.
        CheckpointError: resuming from a missing or corrupt checkpoint; a checkpoint could not be
            written (disk full, no permission).
        NonFiniteLoss: the loss, gradient norm, validation loss or a weight became NaN/Inf (before
            the optimizer step or the write that would have kept it).
        ResourceError: out of memory.
    """
    run_dir = job.run_dir
    metrics = _open_log(run_dir / "metrics.jsonl")
    log = _open_log(run_dir / "train.log")

    def emit(event, show: bool = True) -> None:
        metrics.write(json.dumps({"time": time.time(), **to_record(event)}) + "\n")
        if not show:  # metrics.jsonl only (the steps between log intervals)
            return
        line = format_event(event)
        if line:
            log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        on_event(event)

    try:
        return _Trainer(job, emit).run()
    finally:
        with contextlib.suppress(OSError):  # a full disk must not hide the error being raised
            metrics.close()
        with contextlib.suppress(OSError):
            log.close()


def _open_log(path: Path):
    """Open a line log for appending, first ending a line a killed process left half-written, so
    that it stays one bad line instead of spoiling the next record too."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                with open(path, "a") as out:
                    out.write("\n")
    return open(path, "a", buffering=1)


class _Trainer:
    """One training session, its loop body a list of named calls: step, maybe fit the schedule,
    log, maybe evaluate, maybe checkpoint, should we stop (torchtitan's ``Trainer.train``)."""

    def __init__(self, job: TrainJob, emit: Callable[..., None]) -> None:
        self.job, self.emit = job, emit
        self.cfg, self.rt, self.run_dir = job.cfg, job.runtime, job.run_dir
        self.device = job.runtime.device
        self.state = ckpt_mod.TrainState(schedule_steps=job.cfg.train.max_steps)
        self.stop = _StopFlag()
        self.started = False
        self.reason = "max_steps"
        self.n_evals = 0  # evaluations done in this session
        self.saved: Optional[tuple[int, int]] = None  # (step, n_evals) of the state last put on disk
        self.last_eval: Optional[EvalDone] = None
        self.ckpt_bytes: Optional[int] = None
        self.disk_warned = False
        self.old_config: Optional[str] = None  # config.yaml before this session changed it
        self.saved_here = False  # whether this session wrote a checkpoint

    # -- the session -------------------------------------------------------------------------

    def run(self) -> RunFinished:
        try:
            self.build()
            self.restore()
            self.begin()
            with self.stop:
                self.train()
                return self.finish()
        except KeyboardInterrupt:
            self.undo_config()
            self.mark("interrupted")
            raise
        except Exception as exc:
            self.undo_config()
            if is_out_of_memory(exc):
                err = out_of_memory_advice(self.cfg, self.device, self.state.step + 1, self.run_dir.name)
                self.mark("failed", error=err.message)
                raise err from exc
            self.mark("diverged" if isinstance(exc, NonFiniteLoss) else "failed", error=str(exc))
            raise

    def undo_config(self) -> None:
        """Put back the config.yaml this session replaced, when it failed before its first checkpoint
        (the run on disk then stays as its newest checkpoint describes it)."""
        if self.old_config is not None and not self.saved_here:
            with contextlib.suppress(OSError):
                from tfkit.fsutil import write_text_atomic

                write_text_atomic(self.run_dir / "config.yaml", self.old_config)

    def mark(self, status: str, **fields: Any) -> None:
        """Record how the session ended in ``run.json`` (best effort: the disk may be full)."""
        if self.started:
            runs.try_update_run_info(self.run_dir, status=status, **fields)

    def build(self) -> None:
        cfg, m, device = self.cfg, self.cfg.model, self.device
        torch.manual_seed(cfg.system.seed)
        train_tokens, self.val_tokens = _open_data(cfg, m.vocab_size)
        if len(self.val_tokens) < m.context_length + 1:
            raise DataError(f"validation data has {len(self.val_tokens)} tokens, fewer than context_length+1 = "
                            f"{m.context_length + 1}", "give more validation data (`--val-data`), or lower `model.context_length`")
        self.train_tokens = len(train_tokens)
        self.byte_lengths = _byte_lengths(self.run_dir)
        self.model = build_model(m, attention=self.rt.attention, grad_checkpointing=cfg.system.grad_checkpointing).to(device)
        self.optimizer = build_optimizer(self.model, cfg.optim, torch.device(device).type)
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=self.rt.precision == "fp16")
        self.phases = _Curriculum(cfg, train_tokens)
        self.phases.at(0)
        self.fingerprints = self.job.fingerprints or runs.data_fingerprints(cfg, self.run_dir)

    def restore(self) -> None:
        job, emit = self.job, self.emit
        for note in ckpt_mod.recover_checkpoints(self.run_dir):
            emit(Message(note, "warning"))
        if job.resume:
            if isinstance(job.checkpoint, Path):
                path = job.checkpoint  # verified by the caller; hashing a large checkpoint twice is slow
            else:
                path = ckpt_mod.find_checkpoint(self.run_dir, job.checkpoint, on_warning=lambda s: emit(Message(s, "warning")))
            self.state = state = ckpt_mod.load_training_state(path, self.model, self.optimizer, self.scaler, self.device)
            if job.reset_loader:
                self.phases.at(state.step)
                emit(Message("the training data changed: its data order starts afresh"))
            elif state.loader:
                self.phases.load_state_dict(state.loader, state.step)
            if ckpt_mod.make_latest(self.run_dir, path):
                emit(Message(f"`{path.name}` is now the latest checkpoint; checkpoints written after it belong to "
                             "an abandoned line and are pruned as new ones are written"))
            self.saved = (state.step, 0)
            emit(Message(f"resumed from `{path.name}` (step {state.step}, {state.tokens_seen:,} tokens seen)"))
        elif job.init_from is not None:
            report = ckpt_mod.load_matching_weights(self.model, job.init_from)
            for line in describe_init(report, f"{job.init_from.parent.parent.name}/{job.init_from.name}"):
                emit(Message(line))

    def begin(self) -> None:
        job, cfg, t, state = self.job, self.cfg, self.cfg.train, self.state
        budget = job.time_budget_s
        if budget is None and t.max_time_s is not None:
            budget = max(0.0, t.max_time_s - state.elapsed_s)
        if job.refit_schedule or budget is None or not job.resume:
            state.schedule_steps = t.max_steps
        self.budget = budget
        self.fitted = budget is None or (job.resume and not job.refit_schedule)
        self.step_model = torch.compile(self.model) if self.rt.compile else self.model
        self.phases.at(state.step)
        self.tokens_per_step = t.batch_size * self.phases.context_length * t.grad_accum_steps
        self.flops_tok = self.model.flops_per_token(cfg.model.context_length)
        rt = self.rt
        self.emit(RunStarted(name=self.run_dir.name, run_dir=str(self.run_dir), arch=cfg.model.arch,
                             params=self.model.num_params(), flops_per_token=self.flops_tok, device=self.device,
                             precision=rt.precision, attention=rt.attention, compile=rt.compile, max_steps=t.max_steps,
                             start_step=state.step, max_time_s=budget, tokens_per_step=self.tokens_per_step,
                             train_tokens=self.train_tokens, val_tokens=len(self.val_tokens), resumed=job.resume))
        if job.write_config:
            self.old_config = (self.run_dir / "config.yaml").read_text()
            runs.write_run_config(self.run_dir, cfg)
        runs.update_run_info(self.run_dir, status="training", params=self.model.num_params(), error=None)
        self.started = True
        runs.record_session(self.run_dir, {
            **runs.environment(self.device, job.gpu_names), "event": "resume" if job.resume else "train",
            "from_step": state.step, "runtime": {"precision": rt.precision, "attention": rt.attention,
                                                 "compile": rt.compile},
            "data": self.fingerprints})

    def train(self) -> None:
        state, t = self.state, self.cfg.train
        self.model.train()
        self.session_start = time.perf_counter()
        self.elapsed_before = state.elapsed_s
        self.window = (time.perf_counter(), 0, 0)  # (start, tokens, steps) of the log window
        self.step_times: list[float] = []
        if state.eval_pending:
            self.emit(Message(f"running the evaluation at step {state.step} that a signal cut short"))
            self.evaluate()
        while state.step < t.max_steps:
            if self.should_stop():
                break
            loss, parts, stats, grad_norm, lr, dt = self.train_step()
            self.maybe_fit_schedule(dt)
            last = self.log_step(loss, parts, stats, grad_norm, lr, dt)
            if t.eval_interval and state.step % t.eval_interval == 0 and not last:
                self.evaluate()
                self.window = (time.perf_counter(), *self.window[1:])
            if t.ckpt_interval and state.step % t.ckpt_interval == 0 and not last and self.stop.signal is None:
                self.checkpoint()
                self.window = (time.perf_counter(), *self.window[1:])

    def finish(self) -> RunFinished:
        """The final evaluation and checkpoint (both still under the signal flag), then the summary."""
        state = self.state
        state.elapsed_s = self.elapsed()
        stopped_early = self.reason in ("sigterm", "interrupted")
        if not stopped_early and state.step > 0 and (self.last_eval is None or self.last_eval.step != state.step):
            self.evaluate()  # a signal that arrived meanwhile cuts it short: eval_pending
        if state.step > 0:
            self.checkpoint()
        if self.stop.signal is not None and (stopped_early or state.eval_pending):
            self.reason = self.stop.reason  # work is left (steps, or the final evaluation): resume does it
        if self.reason in ("sigterm", "interrupted"):
            runs.update_run_info(self.run_dir, status="interrupted", elapsed_s=state.elapsed_s)
        else:
            runs.update_run_info(self.run_dir, status="finished", elapsed_s=state.elapsed_s)
        last = self.last_eval
        finished = RunFinished(step=state.step, reason=self.reason, elapsed_s=state.elapsed_s,
                               tokens_seen=state.tokens_seen, val_loss=last.loss if last else None,
                               val_bits_per_byte=last.bits_per_byte if last else None, best_val_loss=state.best_val_loss)
        self.emit(finished)
        return finished

    # -- the loop body -----------------------------------------------------------------------

    def elapsed(self) -> float:
        """Training seconds of the whole run so far (earlier sessions included)."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def should_stop(self) -> bool:
        state, budget = self.state, self.budget
        if self.stop.signal is not None:
            self.reason = self.stop.reason
            return True
        if budget is not None and time.perf_counter() - self.session_start >= budget:
            self.reason = "max_time"
            return True
        if self.fitted and budget is not None and state.step >= state.schedule_steps:
            self.reason = "schedule_done"
            return True
        return False

    def train_step(self) -> tuple[float, dict, dict, float, float, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns loss, parts, stats,
        grad norm, learning rate and seconds."""
        cfg, t, state, device, phases = self.cfg, self.cfg.train, self.state, self.device, self.phases
        step_t0 = time.perf_counter()
        if phases.at(state.step):
            self.tokens_per_step = t.batch_size * phases.context_length * t.grad_accum_steps
            if state.step > 0:
                self.emit(Message(f"curriculum phase {phases.index} from step {state.step}: context_length "
                                  f"{phases.context_length}" + "".join(f", {k} {v:g}" for k, v in phases.overrides.items())))
        self.model.set_progress(state.step, phases.overrides)
        lr = lr_at(state.step, cfg.optim, state.schedule_steps)
        set_lr(self.optimizer, lr)
        loss_acc = torch.zeros((), device=device)
        parts_acc: dict[str, torch.Tensor] = {}
        stats_acc: dict[str, torch.Tensor] = {}
        for _ in range(t.grad_accum_steps):
            x, y = phases.loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device, self.rt.precision):
                out = self.step_model(x, targets=y)
            loss = out.loss / t.grad_accum_steps
            self.scaler.scale(loss).backward()
            loss_acc += loss.detach().float()  # stays on the device: one host sync per step, below
            for k, v in out.parts.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + torch.as_tensor(v, device=device).float() / t.grad_accum_steps
            for k, v in out.stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + torch.as_tensor(v, device=device).float() / t.grad_accum_steps
        loss_sum = float(loss_acc)
        parts = {k: float(v) for k, v in parts_acc.items()}
        stats = {k: float(v) for k, v in stats_acc.items()}
        if not math.isfinite(loss_sum):
            raise self.diverged(f"non-finite loss ({loss_sum}) at step {state.step + 1}; the optimizer step was skipped",
                                "raise `optim.warmup_steps`, or use `system.precision=fp32`")
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise self.diverged(f"non-finite gradient norm at step {state.step + 1}; the optimizer step was skipped",
                                "set `optim.grad_clip`")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        faults.hit("step.end", state.step)
        dt = time.perf_counter() - step_t0
        self.step_times.append(dt)
        start, tokens, steps = self.window
        self.window = (start, tokens + self.tokens_per_step, steps + 1)
        return loss_sum, parts, stats, grad_norm, lr, dt

    def maybe_fit_schedule(self, dt: float) -> None:
        """With a time budget: after 20 measured steps, fix the schedule length the budget allows."""
        t, state, budget, times = self.cfg.train, self.state, self.budget, self.step_times
        if self.fitted or not (len(times) >= 20 or sum(times) > 0.1 * budget):
            return
        self.fitted = True
        warm = times[len(times) // 4:]  # the first steps run slow (allocator, caches)
        sps = sorted(warm)[len(warm) // 2]  # median
        remaining = budget - (time.perf_counter() - self.session_start)
        # an eval batch costs about a third of a training micro-batch (forward only)
        eval_s = t.eval_steps * sps / t.grad_accum_steps / 3
        per_step = sps + (eval_s / t.eval_interval if t.eval_interval else 0.0) \
            + (0.5 / t.ckpt_interval if t.ckpt_interval else 0.0)
        usable = max(0.0, 0.98 * remaining - eval_s - 1.0)  # the final eval and checkpoint
        state.schedule_steps = max(state.step + 1, min(t.max_steps, state.step + int(usable / per_step)))
        self.emit(ScheduleFitted(step=state.step, schedule_steps=state.schedule_steps, seconds_per_step=sps))

    def log_step(self, loss: float, parts: dict, stats: dict, grad_norm: float, lr: float, dt: float) -> bool:
        """Emit the step (shown every ``log_interval``); returns whether it is the schedule's last."""
        t, state = self.cfg.train, self.state
        target = state.schedule_steps if self.fitted else t.max_steps
        last = state.step >= target
        show = state.step % t.log_interval == 0 or last or state.step == 1
        now = time.perf_counter()
        start, tokens, steps = self.window
        if show:  # averages over the log window
            tps, sps_now = tokens / max(1e-9, now - start), (now - start) / max(1, steps)
        else:  # this step alone
            tps, sps_now = self.tokens_per_step / max(1e-9, dt), dt
        eta = (target - state.step) * sps_now
        if self.budget is not None:
            eta = min(eta, max(0.0, self.budget - (now - self.session_start)))
        peak = self.job.peak_flops
        self.emit(StepDone(step=state.step, max_steps=target, loss=loss, lr=lr, grad_norm=grad_norm,
                           tokens_seen=state.tokens_seen, tokens_per_s=tps,
                           mfu=(tps * self.flops_tok / peak) if peak else None, elapsed_s=self.elapsed(), eta_s=eta,
                           memory_bytes=_memory_bytes(self.device), parts=parts, stats=stats), show=show)
        if show:
            self.window = (time.perf_counter(), 0, 0)
        return last

    def evaluate(self) -> Optional[EvalDone]:
        """Validate at the current step; a signal cuts it short (``state.eval_pending``: resume redoes it)."""
        state, t, m = self.state, self.cfg.train, self.cfg.model
        batches = eval_batches(self.val_tokens, t.batch_size, m.context_length, max_batches=t.eval_steps)

        def until_signal():
            for batch in batches:
                if self.stop.signal is not None:
                    raise _EvalCut
                faults.hit("eval.batch", state.step)
                yield batch

        try:
            r = evaluate(self.model, until_signal(), self.device, self.rt.precision, self.byte_lengths)
        except _EvalCut:
            state.eval_pending = True
            self.emit(Message(f"evaluation at step {state.step} cut short by a signal; `tfkit resume` runs it first",
                              "warning"))
            return None
        state.eval_pending = False
        self.n_evals += 1
        if not math.isfinite(r["loss"]):
            raise self.diverged(f"non-finite validation loss ({r['loss']}) at step {state.step}",
                                "use `system.precision=fp32`")
        best = state.best_val_loss is None or r["loss"] < state.best_val_loss
        if best:
            state.best_val_loss, state.best_step = r["loss"], state.step
        state.val_loss = r["loss"]
        ev = EvalDone(step=state.step, loss=r["loss"], perplexity=r["perplexity"], bits_per_byte=r["bits_per_byte"],
                      tokens=r["tokens"], best=best, parts=r["parts"], stats=r["stats"])
        self.emit(ev)
        if best:  # keep exactly these weights: `--checkpoint best` loads them
            with self.stop.deferred():
                self.check_weights()
                ckpt_mod.save_best(self.run_dir, self.model, state.step, {
                    "val_loss": r["loss"], "perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"],
                    "tokens_seen": state.tokens_seen})
        runs.update_run_info(self.run_dir, step=state.step, val_loss=r["loss"], val_bits_per_byte=r["bits_per_byte"],
                             best_val_loss=state.best_val_loss, best_step=state.best_step)
        self.last_eval = ev
        return ev

    def diverged(self, message: str, other_fix: str = "") -> NonFiniteLoss:
        """The error for a run that went non-finite; its hint is the command that resumes from the last
        checkpoint with a quarter of the learning rate, then ``other_fix``."""
        hint = (f"resume from the last checkpoint with a lower learning rate: `tfkit resume {self.run_dir.name} "
                f"--set optim.lr={self.cfg.optim.lr / 4:g}`")
        return NonFiniteLoss(message, f"{hint}; or {other_fix}" if other_fix else hint)

    def check_weights(self) -> None:
        """Refuse to write weights holding NaN/Inf.

        Raises:
            NonFiniteLoss: naming the first such tensor.
        """
        bad = ckpt_mod.first_non_finite(self.model)
        if bad is not None:
            raise self.diverged(f"weight `{bad}` holds NaN or Inf at step {self.state.step}; no checkpoint holding it "
                                "was written")

    def checkpoint(self) -> None:
        """Write a full checkpoint of the current state, unless exactly this state is on disk already;
        signals wait until it is complete."""
        state = self.state
        if self.saved == (state.step, self.n_evals):
            return
        with self.stop.deferred():
            self.check_weights()
            self.warn_if_disk_low()
            t0 = time.perf_counter()
            state.elapsed_s = self.elapsed()
            state.loader = self.phases.state_dict()
            meta = {"config": self.cfg.model_dump(mode="json"), "config_fingerprint": self.cfg.fingerprint(),
                    "data": self.fingerprints}
            path = ckpt_mod.save_checkpoint(self.run_dir, self.model, self.optimizer, state, self.scaler, meta)
            self.saved = (state.step, self.n_evals)
            self.saved_here = True
            self.ckpt_bytes = sum(f.stat().st_size for f in path.iterdir())
            ckpt_mod.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
            runs.update_run_info(self.run_dir, step=state.step, tokens_seen=state.tokens_seen)
        self.emit(CheckpointSaved(step=state.step, path=str(path), seconds=time.perf_counter() - t0))

    def warn_if_disk_low(self) -> None:
        """Warn once when the free space would not hold two more checkpoints of the last one's size."""
        if self.ckpt_bytes is None or self.disk_warned:
            return
        root = ckpt_mod.checkpoints_dir(self.run_dir)
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            return
        if free < 2 * self.ckpt_bytes:
            self.disk_warned = True
            self.emit(Message(f"only {free / 2**20:,.1f} MiB free in `{root}`; a checkpoint takes "
                              f"{self.ckpt_bytes / 2**20:,.1f} MiB", "warning"))
