"""Training on several processes under ``torchrun``: the process group, the ranks, DDP/FSDP2 wrapping,
and gathering a sharded model to one process for a checkpoint.

This is the only tfkit module that imports ``torch.distributed``. Everything here is PyTorch's own
engine: ``torchrun`` (``torch.distributed.run``) starts the processes and sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init` joins its process group (NCCL on CUDA, gloo on the
CPU); the model is wrapped in ``DistributedDataParallel`` or sharded with FSDP2's ``fully_shard``
(Zhao et al., "PyTorch FSDP", arXiv 2304.11277; per-parameter sharding over DTensor); checkpoints
gather the full state with ``torch.distributed.checkpoint.state_dict``.

Decisions every rank must take together (stop on a signal, the time budget, the fitted schedule)
go through a gloo "control" group on CPU tensors, so agreeing on them never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from tfkit.errors import TfkitError
from tfkit.hardware import Runtime

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it; 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class Dist:
    """This process's place in the job: rank, world size, and the collectives the loop needs.

    A single process is ``Dist()`` (rank 0 of 1): every method is then a cheap no-op, so the loop
    has one code path.

    Attributes:
        rank: global rank, 0..world_size-1; rank 0 owns the run folder, logs and dashboard.
        world_size: number of processes.
        local_rank: rank on this node (the CUDA device index it uses).
        backend: ``"nccl"``, ``"gloo"``, or ``None`` for one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    _control: Any = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    # -- collectives -------------------------------------------------------------------------

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` over ranks, in place (on the training backend, so it stays on the device)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world_size)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_flags(self, *values: int) -> list[int]:
        """The largest of each integer over all ranks (CPU, control group): how ranks agree that any
        of them saw a signal or ran out of time."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return [int(v) for v in t.tolist()]

    def sum_ints(self, *values: int) -> list[int]:
        """The sum of each integer over all ranks (CPU, control group)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._control)
        return [int(v) for v in t.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable Python object; control group)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, obj: Any) -> Optional[list[Any]]:
        """Every rank's ``obj`` as a list on rank 0 (``None`` on the other ranks)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give its result to every rank; when it raises there, every rank
        raises (the same message), so no rank waits forever for the others.

        Raises:
            TfkitError: on the other ranks, what rank 0 raised; rank 0 re-raises its own error.
        """
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - told to the other ranks, then re-raised
                error = exc
            self.broadcast(("error", _describe(error)) if error is not None else ("ok", result))
            if error is not None:
                raise error
            return result
        kind, value = self.broadcast(None)
        if kind == "error":
            message, hint, code = value
            raise RankZeroFailed(f"rank 0: {message}", hint, exit_code=code)
        return value

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(group=self._control)

    def close(self) -> None:
        """Leave the process group (at the end of a command)."""
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class RankZeroFailed(TfkitError):
    """Raised on ranks 1..N-1 when rank 0 failed in a step they waited for; it exits with rank 0's
    exit code."""

    def __init__(self, message: str, hint: str = "", exit_code: int = 1) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


class PeerLost(TfkitError):
    """A collective failed because another process of the run died or hung."""


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        t in text for t in ("Connection reset by peer", "Connection closed by peer", "gloo/transport", "NCCL error"))


def _describe(exc: BaseException) -> tuple[str, str, int]:
    if isinstance(exc, TfkitError):
        return exc.message, exc.hint, exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "", 130
    return f"{type(exc).__name__}: {exc}", "", 1


def init(device_type: str, timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1, else return the single-process :class:`Dist`.

    NCCL when training on CUDA (each rank uses GPU ``LOCAL_RANK``), gloo otherwise; a gloo control
    group carries the CPU-side agreements (see :meth:`Dist.max_flags`).

    Raises:
        TfkitError: the torchrun environment is incomplete, or the group cannot be formed.
    """
    world = env_world_size()
    if world <= 1:
        return Dist()
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise TfkitError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set",
                         "start distributed training with `torchrun` or `tfkit train --nproc-per-node N`")
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as exc:  # RuntimeError/DistNetworkError: rendezvous failed
            raise TfkitError(f"cannot join the process group ({backend}, rank {rank} of {world}): {exc}",
                             "check torchrun's --master-addr/--master-port (--rdzv-endpoint) and the network") from None
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    return Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend, _control=control)


def launch(nproc: int, args: list[str]) -> int:
    """Run ``torchrun --standalone --nproc-per-node N -m tfkit ARGS`` in this process (PyTorch's own
    elastic agent, ``torch.distributed.run``) and return the exit code the command should have.

    The agent passes SIGTERM/SIGINT on to every rank; the ranks agree to stop, checkpoint and exit
    143/130, and so does this process. A rank that failed has printed its own error already.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    import logging

    parsed = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "tfkit", *args])
    # each rank prints its own error; the agent's "failed (exitcode: 143)" after a clean stop is noise
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parsed)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        signalled = [c for c in codes if c in (143, 130)]
        if signalled and len(signalled) == len(codes):
            return signalled[0]
        import signal as _signal
        import sys

        rank, first = _cause(exc)
        if first.exitcode < 0:  # killed by a signal: it could not say so itself
            try:
                name = _signal.Signals(-first.exitcode).name
            except ValueError:
                name = f"signal {-first.exitcode}"
            print(f"error: rank {rank} was killed by {name}; the earlier checkpoints are intact\n"
                  "hint: continue with `tfkit resume RUN --nproc-per-node N`", file=sys.stderr)
        code = first.exitcode or next(c for c in codes if c)
        return 128 - code if code < 0 else code
    except SignalException as exc:  # torchrun itself was told to stop; the ranks checkpointed first
        return 128 + int(exc.sigval)
    return 0


def _cause(exc: Any) -> tuple[int, Any]:
    """The failure that brought a run down: a rank killed by a signal other than torchrun's own
    SIGTERM/SIGINT (SIGKILL from the OOM killer, SIGSEGV, SIGABRT), since the ranks that lost it as
    a peer exit with 1 soon after and may be recorded first; else torchrun's first failure."""
    import signal as _signal

    stops = (-int(_signal.SIGTERM), -int(_signal.SIGINT))
    killed = sorted((r, f) for r, f in exc.failures.items() if f.exitcode < 0 and f.exitcode not in stops)
    return killed[0] if killed else exc.get_first_failure()


# ---------------------------------------------------------------------------------------------
# Wrapping


def accum_per_rank(grad_accum_steps: int, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step: ``grad_accum_steps / world_size``
    when it divides (the config's tokens per step are kept), else all of them (N times the tokens)."""
    if grad_accum_steps % world_size == 0:
        return grad_accum_steps // world_size
    return grad_accum_steps


def wrap(model: nn.Module, mode: str, dist_: Dist, runtime: Runtime) -> tuple[nn.Module, frozenset[str]]:
    """The module the training step calls: ``model`` itself (one process), a DDP wrapper, or
    ``model`` sharded in place by FSDP2 (``fully_shard`` on each of ``model.shard_units()``, the
    blocks, then the root).

    DDP: buffers are not re-broadcast each forward (every tfkit buffer is a constant such as RoPE's
    tables); gradients are averaged over ranks. FSDP2: with bf16, ``MixedPrecisionPolicy(param_dtype=
    bf16, reduce_dtype=fp32)``; gradients are reduce-scattered (averaged) in fp32. FSDP2 cannot shard
    0-dim parameters (the DTF gate temperatures, the mHC scales): they become shape (1,) while
    sharded (the models only broadcast them) and are saved and loaded as 0-dim.

    Returns:
        ``(module to call, names of the parameters lifted from 0-dim to (1,))``.
    """
    if mode == "none" or not dist_.enabled:
        return model, frozenset()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        ids = [dist_.local_rank] if runtime.device_type == "cuda" else None
        # newer torch renames broadcast_buffers; either way the buffers are synced once, at wrap time
        params = inspect.signature(DDP.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DDP(model, device_ids=ids, **sync), frozenset()
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(runtime.device_type, (dist_.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        if runtime.autocast_dtype is not None:
            dtype = getattr(torch, runtime.autocast_dtype)
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        lifted = _lift_scalars(model)
        units = model.shard_units() if hasattr(model, "shard_units") else list(getattr(model, "blocks", []))
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return model, lifted
    raise ValueError(f"unknown distributed mode {mode!r}")


def _lift_scalars(model: nn.Module) -> frozenset[str]:
    names = []
    for mod_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                names.append(f"{mod_name}.{name}" if mod_name else name)
    return frozenset(names)


def _unlift(named: dict[str, Any], lifted: frozenset[str], shape: tuple) -> dict[str, Any]:
    """Reshape the lifted parameters' tensors (and their optimizer moments) to ``shape``."""
    def fix(v: Any) -> Any:
        return v.reshape(shape) if torch.is_tensor(v) and v.numel() == 1 and v.ndim != len(shape) else v

    return {k: ({f: (fix(v) if f != "step" else v) for f, v in val.items()} if isinstance(val, dict) else fix(val))
            if k in lifted else val for k, val in named.items()}


def compiled(wrapped: nn.Module, model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(dynamic=False)``: one graph per input shape, so a curriculum phase that
    changes ``context_length`` recompiles once. Under FSDP2 each shard unit is compiled in place
    instead (torchtitan's recipe), leaving FSDP2's all-gather hooks between the graphs."""
    if mode == "fsdp":
        for unit in model.shard_units() if hasattr(model, "shard_units") else []:
            unit.compile(dynamic=False)
        return wrapped
    return torch.compile(wrapped, dynamic=False)


def grad_scaler(runtime: Runtime, mode: str):
    """The fp16 loss scaler (disabled for bf16/fp32). Under FSDP2 each rank holds other gradient
    shards, so the scaler must agree on "any inf" over ranks: ``ShardedGradScaler`` all-reduces it."""
    if mode == "fsdp" and runtime.needs_grad_scaler:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(runtime.device_type)
    return torch.amp.GradScaler(runtime.device_type, enabled=runtime.needs_grad_scaler)


@contextlib.contextmanager
def accumulating(step_model: nn.Module, mode: str, last: bool):
    """Skip the gradient all-reduce on every micro-batch but the last of an optimizer step."""
    if last or mode == "none":
        yield
    elif mode == "ddp" and hasattr(step_model, "no_sync"):
        with step_model.no_sync():
            yield
    elif mode == "fsdp" and hasattr(step_model, "set_requires_gradient_sync"):
        step_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            step_model.set_requires_gradient_sync(True)
    else:
        yield


def plain(t: torch.Tensor) -> torch.Tensor:
    """A local tensor holding the whole value of ``t`` (a DTensor from FSDP2 is gathered)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------------------------------------
# Full state for checkpoints


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str, aliases: dict[str, str],
               is_main: bool, lifted: frozenset[str] = frozenset()) -> Optional[tuple[dict, dict]]:
    """The whole model's weights and the name-keyed optimizer state, on rank 0 (``None`` elsewhere).

    For FSDP2 every rank must call it: the shards are all-gathered and offloaded to rank 0's CPU
    (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``).
    For one process and DDP, rank 0 reads its own replica.

    Args:
        aliases: state-dict keys naming the same tensor as another (tied weights), left out.

    Returns:
        ``(weights, optimizer)``: weights keyed by parameter name, one key per tensor (the
        ``LanguageModel.state_dict_for_save`` form); optimizer as ``{"state": {name: {...}},
        "param_groups": [{..., "params": [names]}]}``.
    """
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = full_weights(model, mode, aliases, is_main, lifted)
        optim = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main:
            return None
        return weights, dict(optim, state=_unlift(optim["state"], lifted, ()))
    if not is_main:
        return None
    from tfkit.train.checkpoint import named_optimizer_state

    return full_weights(model, mode, aliases, is_main), named_optimizer_state(model, optimizer)


def full_weights(model: nn.Module, mode: str, aliases: dict[str, str], is_main: bool,
                 lifted: frozenset[str] = frozenset()) -> Optional[dict[str, torch.Tensor]]:
    """The whole model's weights on rank 0, one key per tensor (``None`` on other ranks).
    FSDP2: every rank must call it."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _unlift({k: v for k, v in weights.items() if k not in aliases}, lifted, ()) if is_main else None
    if not is_main:
        return None
    return model.state_dict_for_save()  # type: ignore[operator]


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optim: dict, mode: str, aliases: dict[str, str], lifted: frozenset[str] = frozenset()) -> None:
    """Load full weights and a name-keyed optimizer state (as :func:`full_state` gives) on every rank.

    Args:
        aliases: state-dict keys naming the same tensor as another key (tied weights), found before
            sharding; a checkpoint stores only the target key.

    Raises:
        CheckpointError: the tensors or optimizer groups do not fit the model.
    """
    from tfkit.train.checkpoint import load_named_optimizer_state

    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = _unlift(dict(weights), lifted, (1,))
        optim = dict(optim, state=_unlift(optim["state"], lifted, (1,)))
        for alias, target in aliases.items():
            if target in weights:
                full.setdefault(alias, full[target])
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, full, options=opts)
        set_optimizer_state_dict(model, optimizer, optim, options=opts)
        return
    model.load_state_dict_from_save(weights)  # type: ignore[operator]
    load_named_optimizer_state(model, optimizer, optim)
