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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from tfkit.config import RunConfig
from tfkit.data.loader import BatchLoader, Prefetcher, eval_batches, hold_out
from tfkit.data.tokenfile import TokenFile
from tfkit.errors import CheckpointError, DataError, ResourceError, TfkitError
from tfkit.hardware import Runtime
from tfkit.models import build_model
from tfkit.train import checkpoint as ckpt_mod
from tfkit.train import distributed, faults, runs
from tfkit.train.distributed import Dist
from tfkit.train.evaluate import evaluate
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
        dist: this process's rank and world size under torchrun (one process by default); rank 0
            alone writes the run folder, the logs and the events.
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
    dist: Dist = field(default_factory=Dist)


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


@dataclass
class _Data:
    """The token arrays of a run, with their loss masks when the loss counts only the assistant
    turns of conversation data (``data.loss_on=assistant`` and a token file with a mask)."""

    train: Any
    val: Any
    train_mask: Any = None
    val_mask: Any = None

    @property
    def masked(self) -> bool:
        return self.train_mask is not None


def _open_data(cfg: RunConfig, vocab_size: int) -> _Data:
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
        if not masked(cfg, train_file):
            return _Data(train_file.tokens, val_file.tokens)
        return _Data(train_file.tokens, val_file.tokens, train_file.mask_view(), val_file.mask_view())
    train, val = hold_out(train_file.tokens, cfg.data.val_fraction)
    if not masked(cfg, train_file):
        return _Data(train, val)
    mask = train_file.mask_view()
    return _Data(train, val, mask.slice(0, len(train)), mask.slice(len(train), len(mask)))


def masked(cfg: RunConfig, train_file: TokenFile) -> bool:
    """Whether the loss counts only marked tokens: ``data.loss_on=assistant`` and a training file
    with a loss mask (conversations). A validation file without one then counts every token."""
    return cfg.data.loss_on == "assistant" and train_file.has_mask


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


def prefetches(runtime: Runtime) -> bool:
    """Whether batches are drawn ahead in a thread: on an accelerator, where the host would wait
    otherwise; not on the CPU, whose cores the step itself uses."""
    return runtime.device_type != "cpu"


class _Curriculum:
    """The data loader and model settings of the ``train.curriculum`` phase in force at each step.

    Each phase trains on windows of its own ``context_length`` from a loader of its own (seeded
    ``seed + phase + 1``; the steps before the first phase use the model's context and ``seed``),
    so a resumed run rebuilds exactly the loader it checkpointed.
    """

    def __init__(self, cfg: RunConfig, tokens, rank: int = 0, world_size: int = 1, prefetch: bool = False,
                 pin: bool = False, mask: Any = None) -> None:
        self.cfg, self.tokens, self.mask = cfg, tokens, mask
        self.rank, self.world_size, self.prefetch, self.pin = rank, world_size, prefetch, pin
        self.index: Optional[int] = None
        self.loader: Optional[BatchLoader] = None
        self.feed: Optional[Prefetcher] = None
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
        self.close()
        self.loader = BatchLoader(self.tokens, self.cfg.train.batch_size, t, seed=self.cfg.system.seed + index + 1,
                                  mask=self.mask)
        if self.prefetch:  # an accelerator: draw the next batch while the device runs this one
            self.feed = Prefetcher(self.loader, self.rank, self.world_size, pin=self.pin)
        return True

    def next_batch(self):
        """This rank's next micro-batch ``(x, y)``, (B, T) int64 CPU tensors."""
        if self.feed is not None:
            return self.feed.next_batch()
        return self.loader.next_batch(self.rank, self.world_size)

    def state_dict(self) -> dict:
        source = self.feed if self.feed is not None else self.loader
        return {**source.state_dict(), "phase": self.index}

    def load_state_dict(self, state: dict, step: int) -> None:
        self.at(step)
        if state.get("phase", -1) == self.index:  # else the checkpoint ended a phase: the next one starts fresh
            (self.feed if self.feed is not None else self.loader).load_state_dict(state)

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
            self.feed = None


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
    if not job.dist.is_main:  # rank 0 alone writes the logs and shows the events
        return _Trainer(job, lambda event, show=True: None).run()
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
    log, maybe evaluate, maybe checkpoint, should we stop (torchtitan's ``Trainer.train``).

    Under torchrun every rank runs this same object; rank 0 alone touches the run folder. Whatever
    decides the control flow (a signal, the time budget, the fitted schedule, a non-finite loss)
    is agreed by all ranks first, so that no rank waits on a collective the others never enter.
    """

    def __init__(self, job: TrainJob, emit: Callable[..., None]) -> None:
        self.job, self.emit = job, emit
        self.cfg, self.rt, self.run_dir = job.cfg, job.runtime, job.run_dir
        self.device = job.runtime.device
        self.dist = job.dist
        self.main = job.dist.is_main
        self.mode = job.runtime.distributed if job.dist.enabled else "none"
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
        self.pending: list[tuple[int, float, list[str], list[str], torch.Tensor]] = []  # steps not yet read back

    # -- the session -------------------------------------------------------------------------

    def run(self) -> RunFinished:
        try:
            return self._run()
        finally:
            if hasattr(self, "phases"):
                self.phases.close()

    def _run(self) -> RunFinished:
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
            if self.dist.enabled and distributed.peer_lost(exc):
                err = distributed.PeerLost(
                    f"rank {self.dist.rank}: another process of this run stopped (at step {self.state.step + 1}); "
                    "the earlier checkpoints are intact", f"continue with `tfkit resume {self.run_dir.name} "
                    f"--nproc-per-node {self.dist.world_size}`")
                self.mark("failed", error=err.message)
                raise err from exc
            if is_out_of_memory(exc):
                err = out_of_memory_advice(self.cfg, self.device, self.state.step + 1, self.run_dir.name)
                self.mark("failed", error=err.message)
                raise err from exc
            self.mark("diverged" if isinstance(exc, NonFiniteLoss) else "failed", error=str(exc))
            raise

    def undo_config(self) -> None:
        """Put back the config.yaml this session replaced, when it failed before its first checkpoint
        (the run on disk then stays as its newest checkpoint describes it)."""
        if self.main and self.old_config is not None and not self.saved_here:
            with contextlib.suppress(OSError):
                from tfkit.fsutil import write_text_atomic

                write_text_atomic(self.run_dir / "config.yaml", self.old_config)

    def mark(self, status: str, **fields: Any) -> None:
        """Record how the session ended in ``run.json`` (best effort: the disk may be full)."""
        if self.started and self.main:
            runs.try_update_run_info(self.run_dir, status=status, **fields)

    def build(self) -> None:
        cfg, m, device, job = self.cfg, self.cfg.model, self.device, self.job
        self.configured = self.rt.configure()
        torch.manual_seed(cfg.system.seed)  # the same initial weights on every rank
        self.data = data = _open_data(cfg, m.vocab_size)
        train_tokens, self.val_tokens = data.train, data.val
        if len(self.val_tokens) < m.context_length + 1:
            raise DataError(f"validation data has {len(self.val_tokens)} tokens, fewer than context_length+1 = "
                            f"{m.context_length + 1}", "give more validation data (`--val-data`), or lower `model.context_length`")
        self.train_tokens = len(train_tokens)
        self.byte_lengths = _byte_lengths(self.run_dir)
        self.model = build_model(m, attention=self.rt.attention, grad_checkpointing=cfg.system.grad_checkpointing,
                                 device=device)
        self.init_report = None
        if job.init_from is not None and not job.resume:  # before sharding: every rank loads the same file
            self.init_report = ckpt_mod.load_matching_weights(self.model, job.init_from)
        self.model.to(device)
        if self.dist.rank:  # its own random stream (latents, sampling) from here on; rank 0 keeps the run's
            torch.manual_seed(int(np.random.SeedSequence([cfg.system.seed, self.dist.rank]).generate_state(1)[0]))
        self.aliases = self.model._aliases()  # tied weights, found before FSDP2 turns them into DTensors
        self.wrapped, self.lifted = distributed.wrap(self.model, self.mode, self.dist, self.rt)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.rt.device_type)  # after sharding
        self.scaler = distributed.grad_scaler(self.rt, self.mode)
        self.accum = distributed.accum_per_rank(cfg.train.grad_accum_steps, self.dist.world_size)
        self.phases = _Curriculum(cfg, train_tokens, self.dist.rank, self.dist.world_size,
                                  prefetch=prefetches(self.rt), pin=self.rt.device_type == "cuda", mask=data.train_mask)
        self.phases.at(0)
        self.fingerprints = job.fingerprints or (runs.data_fingerprints(cfg, self.run_dir) if self.main else None)

    def restore(self) -> None:
        job, emit = self.job, self.emit
        if self.main:
            for note in ckpt_mod.recover_checkpoints(self.run_dir):
                emit(Message(note, "warning"))
        if job.resume:
            def find() -> Path:
                if isinstance(job.checkpoint, Path):
                    return job.checkpoint  # verified by the caller; hashing a large checkpoint twice is slow
                return ckpt_mod.find_checkpoint(self.run_dir, job.checkpoint,
                                                on_warning=lambda s: emit(Message(s, "warning")))

            path = self.dist.on_main(find)
            files = ckpt_mod.read_training_state(path, self.device)
            try:
                distributed.load_full_state(self.model, self.optimizer, files.weights, files.optimizer, self.mode,
                                            self.aliases, self.lifted)
            except (RuntimeError, ValueError, KeyError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"`{path}` does not fit this model: {first}",
                                      "the run's config.yaml and its checkpoint disagree; use an earlier checkpoint") from None
            ckpt_mod.restore_extras(files, self.optimizer, self.scaler, self.dist.rank)
            self.state = state = files.state
            if files.world_size != self.dist.world_size:
                emit(Message(f"`{path.name}` was written by {files.world_size} process(es), this session runs "
                             f"{self.dist.world_size}: it continues from the same data position, but not bit-exactly "
                             "(a different sum order of the gradients, other random streams)", "warning"))
            if job.reset_loader:
                self.phases.at(state.step)
                emit(Message("the training data changed: its data order starts afresh"))
            elif state.loader:
                self.phases.load_state_dict(state.loader, state.step)
            if self.main and ckpt_mod.make_latest(self.run_dir, path):
                emit(Message(f"`{path.name}` is now the latest checkpoint; checkpoints written after it belong to "
                             "an abandoned line and are pruned as new ones are written"))
            self.saved = (state.step, 0)
            emit(Message(f"resumed from `{path.name}` (step {state.step}, {state.tokens_seen:,} tokens seen)"))
        elif self.init_report is not None:
            init = job.init_from
            for line in describe_init(self.init_report, f"{init.parent.parent.name}/{init.name}"):
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
        self.step_model = distributed.compiled(self.wrapped, self.model, self.mode) if self.rt.compile else self.wrapped
        self.phases.at(state.step)
        self.flops_tok = self.model.flops_per_token(self.phases.context_length)
        rt, n = self.rt, self.dist.world_size
        self.emit(RunStarted(name=self.run_dir.name, run_dir=str(self.run_dir), arch=cfg.model.arch,
                             params=self.model.num_params(), flops_per_token=self.flops_tok, device=self.device,
                             precision=rt.precision, attention=rt.attention, compile=rt.compile, max_steps=t.max_steps,
                             start_step=state.step, max_time_s=budget, tokens_per_step=self.tokens_per_step,
                             train_tokens=self.train_tokens, val_tokens=len(self.val_tokens), resumed=job.resume))
        if n > 1:
            a = t.grad_accum_steps
            split = (f"train.grad_accum_steps {a} = {self.accum} per rank x {n} ranks: an optimizer step holds the "
                     f"config's {self.tokens_per_step:,} tokens" if self.accum * n == a else
                     f"train.grad_accum_steps {a} does not divide by {n} ranks: each rank accumulates {a}, so an "
                     f"optimizer step holds {n}x the config's tokens ({self.tokens_per_step:,})")
            self.emit(Message(f"{self.mode.upper()} over {n} processes ({self.dist.backend}); {split}"))
        if job.write_config and self.main:
            self.old_config = (self.run_dir / "config.yaml").read_text()
            runs.write_run_config(self.run_dir, cfg)
        self.started = True
        if not self.main:
            return
        runs.update_run_info(self.run_dir, status="training", params=self.model.num_params(), error=None)
        runs.record_session(self.run_dir, {
            **runs.environment(self.rt, job.gpu_names), "event": "resume" if job.resume else "train",
            "from_step": state.step, "world_size": n, "runtime": {
                "precision": rt.precision, "attention": rt.attention, "compile": rt.compile, "distributed": self.mode,
                "switches": self.configured},
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
            self.train_step()
            last = self.maybe_log()
            if t.eval_interval and state.step % t.eval_interval == 0 and not last:
                self.evaluate()
                self.window = (time.perf_counter(), *self.window[1:])
            if t.ckpt_interval and state.step % t.ckpt_interval == 0 and not last:
                self.checkpoint()  # a stop now writes this same state once (finish() finds it saved)
                self.window = (time.perf_counter(), *self.window[1:])

    def finish(self) -> RunFinished:
        """The final evaluation and checkpoint (both still under the signal flag), then the summary."""
        state = self.state
        self.flush()
        state.elapsed_s = self.elapsed()
        stopped_early = self.reason in ("sigterm", "interrupted")
        if not stopped_early and state.step > 0 and (self.last_eval is None or self.last_eval.step != state.step):
            self.evaluate()  # a signal that arrived meanwhile cuts it short: eval_pending
        if state.step > 0:
            self.checkpoint()
        if self.agreed_signal() is not None and (stopped_early or state.eval_pending):
            self.reason = self.stop.reason  # work is left (steps, or the final evaluation): resume does it
        if self.main:
            status = "interrupted" if self.reason in ("sigterm", "interrupted") else "finished"
            runs.update_run_info(self.run_dir, status=status, elapsed_s=state.elapsed_s)
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

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks, at the current phase's context length."""
        return self.dist.world_size * self.accum * self.cfg.train.batch_size * self.phases.context_length

    def agreed_signal(self) -> Optional[int]:
        """The signal any rank received (SIGTERM wins over SIGINT), now this rank's too; ``None`` if none."""
        (sig,) = self.dist.max_flags(self.stop.signal or 0)
        if sig and self.stop.signal is None:
            self.stop.signal = sig
        return sig or None

    def should_stop(self) -> bool:
        state, budget = self.state, self.budget
        out_of_time = budget is not None and time.perf_counter() - self.session_start >= budget
        sig, out_of_time = self.dist.max_flags(self.stop.signal or 0, int(out_of_time))  # every rank stops together
        if sig:
            self.stop.signal = self.stop.signal or sig
            self.reason = self.stop.reason
            return True
        if out_of_time:
            self.reason = "max_time"
            return True
        if self.fitted and budget is not None and state.step >= state.schedule_steps:
            self.reason = "schedule_done"
            return True
        return False

    def train_step(self) -> None:
        """One optimizer step over this rank's micro-batches. Loss, parts, stats and the gradient norm
        stay on the device until :meth:`read_back` (no host sync here)."""
        cfg, state, device, phases, n = self.cfg, self.state, self.device, self.phases, self.accum
        if phases.at(state.step):
            self.flops_tok = self.model.flops_per_token(phases.context_length)
            if state.step > 0:
                self.emit(Message(f"curriculum phase {phases.index} from step {state.step}: context_length "
                                  f"{phases.context_length}" + "".join(f", {k} {v:g}" for k, v in phases.overrides.items())))
        self.model.set_progress(state.step, phases.overrides)
        lr = lr_at(state.step, cfg.optim, state.schedule_steps)
        set_lr(self.optimizer, lr)
        loss_acc = torch.zeros((), device=device)
        parts_acc: dict[str, torch.Tensor] = {}
        stats_acc: dict[str, torch.Tensor] = {}
        batches = [phases.next_batch() for _ in range(n)]
        weights, counted = self.micro_weights(batches)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with distributed.accumulating(self.wrapped, self.mode, last=i == n - 1):
                with self.rt.autocast:
                    out = self.step_model(x, targets=y)
                loss = out.loss / n if weights is None else out.loss * weights[i]
                self.scaler.scale(loss).backward()
            loss_acc += loss.detach().float()
            for k, v in out.parts.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + torch.as_tensor(v, device=device).float() / n
            for k, v in out.stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + torch.as_tensor(v, device=device).float() / n
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = distributed.plain(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        faults.hit("step.end", state.step)
        if counted is not None:  # targets the loss counted on all ranks (the same on each)
            stats_acc["loss_tokens"] = torch.tensor(float(counted), device=device)
        row = torch.stack([loss_acc, grad_norm.float().to(device), *parts_acc.values(), *stats_acc.values()])
        self.pending.append((state.step, lr, list(parts_acc), list(stats_acc), row))
        start, tokens, steps = self.window
        self.window = (start, tokens + self.tokens_per_step, steps + 1)

    def micro_weights(self, batches: list) -> tuple[Optional[list[float]], Optional[int]]:
        """The factor of each micro-batch's mean loss in the step's loss, and the targets counted.

        Without a loss mask every micro-batch holds B*T targets: ``1/n`` each (the mean of means).
        With one (conversations, ``data.loss_on=assistant``) micro-batch i holds c_i counted targets,
        and the step's loss is the sum of all counted targets' losses over their number C on all
        ranks: ``c_i * N / C`` (DDP/FSDP average gradients over the N ranks). A step with no counted
        target anywhere gets zero weights: no NaN. The counts are read on the host before the
        batches go to the device (one small all-reduce over the control group with N > 1).

        Returns:
            (weights, C); (None, None) without a mask (the loop divides by n, as it always has).
        """
        if not self.data.masked:
            return None, None
        counts = [int((y >= 0).sum()) for _, y in batches]
        total = self.dist.sum_ints(sum(counts))[0]
        world = self.dist.world_size
        return [c * world / total if total else 0.0 for c in counts], total

    def read_back(self) -> list[tuple[int, float, float, float, dict, dict]]:
        """Bring the pending steps' figures to the host in one transfer (averaged over ranks), and
        stop at the first non-finite one.

        Returns:
            ``(step, lr, loss, grad_norm, parts, stats)`` per pending step.

        Raises:
            NonFiniteLoss: a loss or (without a grad scaler) a gradient norm is NaN/Inf; no
                checkpoint holding its update was written (checkpoints read back first).
        """
        pending, self.pending = self.pending, []
        if not pending:
            return []
        rows = self.dist.mean_(torch.cat([r[-1] for r in pending])).tolist()  # the one host sync
        out, i = [], 0
        for step, lr, pk, sk, row in pending:
            vals = rows[i:i + len(row)]
            i += len(row)
            loss, grad_norm = vals[0], vals[1]
            if not math.isfinite(loss):
                raise self.diverged(f"non-finite loss ({loss}) at step {step}; no checkpoint holding it was written",
                                    "raise `optim.warmup_steps`, or use `system.precision=fp32`")
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                raise self.diverged(f"non-finite gradient norm at step {step}; no checkpoint holding it was written",
                                    "set `optim.grad_clip`")
            parts = dict(zip(pk, vals[2:2 + len(pk)]))
            stats = dict(zip(sk, vals[2 + len(pk):]))
            out.append((step, lr, loss, grad_norm, parts, stats))
        return out

    def maybe_log(self) -> bool:
        """Every ``log_interval`` steps (and on the first and last): read the figures back and show the
        step; until the schedule is fitted to a time budget, read back every step (its time counts).
        Returns whether this step is the schedule's last."""
        t, state = self.cfg.train, self.state
        target = state.schedule_steps if self.fitted else t.max_steps
        show = state.step % t.log_interval == 0 or state.step >= target or state.step == 1
        if show or not self.fitted:
            self.flush(show)
        return state.step >= (state.schedule_steps if self.fitted else t.max_steps)

    def flush(self, show: bool = False) -> None:
        """Read the pending steps back (:meth:`read_back`), emit a :class:`StepDone` for each
        (``metrics.jsonl`` gets all; the screen the last one when ``show``) and fit the schedule."""
        t, state = self.cfg.train, self.state
        now = time.perf_counter()
        start, tokens, steps = self.window
        rows = self.read_back()
        if not rows:
            return
        seconds = (now - start) / max(1, steps)  # per step over the window: the device's pace, not the host's
        self.step_times.extend([seconds] * len(rows))
        self.maybe_fit_schedule()
        target = state.schedule_steps if self.fitted else t.max_steps
        show = show or state.step >= target
        tps = tokens / max(1e-9, now - start)
        eta = (target - state.step) * seconds
        if self.budget is not None:
            eta = min(eta, max(0.0, self.budget - (now - self.session_start)))
        peak = self.job.peak_flops
        mfu = tps * self.flops_tok / (peak * self.dist.world_size) if peak else None
        memory = self.rt.peak_memory_bytes()
        for k, (step, lr, loss, grad_norm, parts, stats) in enumerate(rows):
            self.emit(StepDone(step=step, max_steps=target, loss=loss, lr=lr, grad_norm=grad_norm,
                               tokens_seen=state.tokens_seen - (len(rows) - 1 - k) * self.tokens_per_step,
                               tokens_per_s=tps, mfu=mfu, elapsed_s=self.elapsed(), eta_s=eta, memory_bytes=memory,
                               parts=parts, stats=stats), show=show and k == len(rows) - 1)
        if show:
            self.window = (time.perf_counter(), 0, 0)

    def maybe_fit_schedule(self) -> None:
        """With a time budget: after 20 measured steps, fix the schedule length the budget allows
        (rank 0 decides, every rank follows)."""
        t, state, budget, times = self.cfg.train, self.state, self.budget, self.step_times
        if self.fitted:
            return
        proposal = None
        if len(times) >= 20 or sum(times) > 0.1 * budget:
            warm = times[len(times) // 4:]  # the first steps run slow (allocator, caches)
            sps = sorted(warm)[len(warm) // 2]  # median
            remaining = budget - (time.perf_counter() - self.session_start)
            # an eval batch costs about a third of a training micro-batch (forward only)
            eval_s = t.eval_steps * sps / self.accum / 3
            per_step = sps + (eval_s / t.eval_interval if t.eval_interval else 0.0) \
                + (0.5 / t.ckpt_interval if t.ckpt_interval else 0.0)
            usable = max(0.0, 0.98 * remaining - eval_s - 1.0)  # the final eval and checkpoint
            proposal = (max(state.step + 1, min(t.max_steps, state.step + int(usable / per_step))), sps)
        proposal = self.dist.broadcast(proposal)
        if proposal is None:
            return
        self.fitted = True
        state.schedule_steps, sps = proposal
        self.emit(ScheduleFitted(step=state.step, schedule_steps=state.schedule_steps, seconds_per_step=sps))

    def eval_batches(self):
        """This rank's share of the validation batches, as ``(x, y, counted)``: every rank runs the
        same number of forwards (FSDP2 all-gathers in each), padding with an uncounted one."""
        t, m, n, r = self.cfg.train, self.cfg.model, self.dist.world_size, self.dist.rank
        batches = eval_batches(self.val_tokens, t.batch_size, m.context_length, max_batches=t.eval_steps,
                               mask=self.data.val_mask)
        if n == 1:
            for x, y in batches:
                yield x, y, True
            return
        every = list(batches)
        for i in range(r, -(-len(every) // n) * n, n):
            yield (*every[i], True) if i < len(every) else (*every[0], False)

    def evaluate(self) -> Optional[EvalDone]:
        """Validate at the current step; a signal cuts it short (``state.eval_pending``: resume redoes it)."""
        state = self.state
        self.flush()

        def until_signal():
            for batch in self.eval_batches():
                if self.agreed_signal() is not None:
                    raise _EvalCut
                faults.hit("eval.batch", state.step)
                yield batch

        try:
            r = evaluate(self.model, until_signal(), self.rt, self.byte_lengths,
                         reduce=self.dist.sum_)
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
                weights = distributed.full_weights(self.model, self.mode, self.aliases, self.main, self.lifted)
                info = {"val_loss": r["loss"], "perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"],
                        "tokens_seen": state.tokens_seen}

                def save_best() -> None:
                    self.check_weights(weights)
                    ckpt_mod.save_best(self.run_dir, weights, state.step, info)
                    runs.update_run_info(self.run_dir, step=state.step, val_loss=r["loss"],
                                         val_bits_per_byte=r["bits_per_byte"], best_val_loss=state.best_val_loss,
                                         best_step=state.best_step)

                self.dist.on_main(save_best)
        elif self.main:
            runs.update_run_info(self.run_dir, step=state.step, val_loss=r["loss"], val_bits_per_byte=r["bits_per_byte"])
        self.last_eval = ev
        return ev

    def diverged(self, message: str, other_fix: str = "") -> NonFiniteLoss:
        """The error for a run that went non-finite; its hint is the command that resumes from the last
        checkpoint with a quarter of the learning rate, then ``other_fix``."""
        hint = (f"resume from the last checkpoint with a lower learning rate: `tfkit resume {self.run_dir.name} "
                f"--set optim.lr={self.cfg.optim.lr / 4:g}`")
        return NonFiniteLoss(message, f"{hint}; or {other_fix}" if other_fix else hint)

    def check_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Refuse to write weights holding NaN/Inf.

        Raises:
            NonFiniteLoss: naming the first such tensor.
        """
        bad = ckpt_mod.first_non_finite(weights)
        if bad is not None:
            raise self.diverged(f"weight `{bad}` holds NaN or Inf at step {self.state.step}; no checkpoint holding it "
                                "was written")

    def checkpoint(self) -> None:
        """Write a full checkpoint of the current state, unless exactly this state is on disk already;
        signals wait until it is complete. Rank 0 writes what all ranks gathered to it."""
        state = self.state
        self.flush()
        if self.saved == (state.step, self.n_evals):
            return
        with self.stop.deferred():
            t0 = time.perf_counter()
            state.elapsed_s = self.elapsed()
            state.loader = self.phases.state_dict()
            full = distributed.full_state(self.model, self.optimizer, self.mode, self.aliases, self.main, self.lifted)
            rngs = self.dist.gather(ckpt_mod.rng_state())

            def write() -> Path:
                weights, optim = full
                self.check_weights(weights)
                self.warn_if_disk_low()
                meta = {"config": self.cfg.model_dump(mode="json"), "config_fingerprint": self.cfg.fingerprint(),
                        "data": self.fingerprints}
                path = ckpt_mod.save_checkpoint(self.run_dir, weights, optim, state, self.scaler, meta, rngs)
                self.ckpt_bytes = sum(f.stat().st_size for f in path.iterdir())
                ckpt_mod.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
                runs.update_run_info(self.run_dir, step=state.step, tokens_seen=state.tokens_seen)
                return path

            path = self.dist.on_main(write)
            self.saved = (state.step, self.n_evals)
            self.saved_here = True
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
