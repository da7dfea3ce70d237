"""Data-parallel training under ``torchrun``: one process per device, one global batch.

``torchrun --nproc_per_node=N -m experiments.pretrain --config ...`` starts N processes;
:func:`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), gives each rank its device (``cuda:LOCAL_RANK`` or the CPU) and joins the process
group (NCCL on CUDA, gloo on the CPU). Started without torchrun nothing here does anything, and
``backbone.training.loop.train`` runs exactly as it always did.

How the work is split (``train`` uses all of it):

- Data: every rank cuts the same global batch and keeps its slice of the rows
  (``BatchLoader(..., rank=, world_size=)``); random draws (crops, flips, stochastic-depth masks)
  are made for the whole global batch, so the union over ranks is the one-process batch.
- Gradients: :func:`average_gradients` all-reduces them after ``backward`` in one flat buffer,
  in place of ``DistributedDataParallel``. Masked blocks leave parameters without a gradient on
  a rank whose rows all skip them; DDP would need ``find_unused_parameters=True`` (a walk over the
  autograd graph every step). Here whether a parameter has a gradient is known on the host, so it
  travels in the per-step control message, and a parameter no row of the *global* batch used
  keeps ``grad=None`` exactly as in one process (SGD then leaves it alone). It also syncs
  gradients of forwards that do not go through a wrapper (``loss_fn`` of the gates, hooks), and
  state dicts keep their keys. The price: no overlap of communication with ``backward``.
- BatchNorm: batch statistics per rank (as DDP without SyncBatchNorm, and as the original ResNet
  recipe did per GPU). SyncBatchNorm is not used: a masked block runs on a rank only when one of
  its rows keeps it, so ranks would enter different numbers of BN collectives and hang. The
  running statistics of rank 0 are the model's: checkpoints are rank 0's, and
  :func:`broadcast_module` hands them to the other ranks before a sharded validation.
- Control: a stop signal, a checkpoint that is due and the has-a-gradient bits go through one
  small all-reduce (MAX) on the CPU per step (a gloo group also when training runs on NCCL, so it
  never waits for the GPU), so every rank stops and checkpoints at the same step.
- Writing: only rank 0 writes (checkpoints, metrics, TensorBoard); :func:`run_on_main` runs a
  step such as preparing the run directory there and raises its error on every rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from backbone import errors
from backbone.errors import ConfigError, DyndepthError

T = TypeVar("T")


class LaunchError(DyndepthError):
    """A distributed launch that cannot work (no rendezvous, too few GPUs, ...)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    control_group: Any = None  # gloo group for host-side messages (None: the default group)

    @property
    def enabled(self) -> bool:
        """True when a process group is running (torchrun, even with one process)."""
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context: DistContext | None = None


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or a hand-made launch with RANK/WORLD_SIZE) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    """The world size torchrun announced (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def current() -> DistContext:
    """The context of this process: the one :func:`init_distributed` made, one derived from a
    process group a library user started, or the single-process default."""
    if dist.is_available() and dist.is_initialized():
        if _context is not None and _context.world_size == dist.get_world_size():
            return _context
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def is_main_process() -> bool:
    """Rank 0, or a process outside any distributed job; before the process group is up the
    decision comes from torchrun's RANK variable, so other ranks never write."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Join the process group torchrun set up; without torchrun: the single-process context.

    ``device``: the config's device (``auto``, ``cpu`` or ``cuda``); each rank takes
    ``cuda:LOCAL_RANK``. ``timeout_s`` (default ``$DYNDEPTH_DIST_TIMEOUT_S`` or 600): how long
    the rendezvous and any collective may wait for the other ranks. Bad launches are a
    :class:`LaunchError` or ``ConfigError`` with what to change.
    """
    global _context
    if not launched_by_torchrun():
        return DistContext()
    if dist.is_initialized():
        return current()
    env = {k: int(os.environ.get(k, default)) for k, default in
           (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 0))}
    rank, world, local_rank = env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]
    local_world = env["LOCAL_WORLD_SIZE"] or world
    if device.startswith("cuda:"):
        raise ConfigError(f"under torchrun each process takes cuda:LOCAL_RANK: set device: cuda (or auto), not {device}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_world > available:
            raise LaunchError(
                f"torchrun started {local_world} processes on this machine (--nproc_per_node) with device: cuda, "
                f"but it has {available} CUDA device(s): start at most {available}, or set device: cpu")
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
    elif device not in ("auto", "cpu"):
        raise ConfigError(f"unknown device {device!r} under torchrun: use auto, cpu or cuda")
    else:
        rank_device = torch.device("cpu")
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("DYNDEPTH_DIST_TIMEOUT_S", 600))
    backend = "nccl" if use_cuda else "gloo"
    _import_modules_that_capture_the_world_group()
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
        # Host-side flags on the CPU: with NCCL they would need a GPU tensor and a sync each step.
        control = dist.new_group(backend="gloo") if backend == "nccl" else None
    except (RuntimeError, ValueError, OSError) as exc:  # DistError and store timeouts are RuntimeErrors
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LaunchError(
            f"rank {rank} of {world} could not join the other ranks at {where} within {timeout:g} s ({detail}); "
            f"start every rank (torchrun --nproc_per_node=N does), check MASTER_ADDR/MASTER_PORT, "
            f"or raise DYNDEPTH_DIST_TIMEOUT_S") from exc
    _context = DistContext(rank, world, local_rank, rank_device, control)
    return _context


def _import_modules_that_capture_the_world_group() -> None:
    """Import, before the process group exists, the torch modules that keep it alive otherwise.

    ``torch.distributed.nn.functional`` takes ``group=group.WORLD`` as its functions' default
    argument, evaluated at import; ``torch._dynamo`` imports it on first use (a
    ``torch.compiler.disable``d function's first call, e.g. the stem's). Imported after
    ``init_process_group``, those defaults hold the world group for ever: destroying it then frees
    nothing, gloo's worker threads outlive ``main``, and one of them releasing a tensor while the
    interpreter shuts down ended 1 in ~30 torchrun runs with SIGABRT ("terminate called without
    an active exception"; tests/test_distributed.py checks that shutdown joins the threads).
    """
    import torch.distributed.nn  # noqa: F401


def shutdown() -> None:
    """Leave the process group (if this process joined one); its worker threads end here."""
    global _context
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _context = None


def barrier() -> None:
    ctx = current()
    if ctx.enabled:
        dist.barrier(group=ctx.control_group)


def all_reduce_sum(values: torch.Tensor, host: bool = False) -> torch.Tensor:
    """Sum of ``values`` over ranks, in place; returns it. ``values`` live on the process group's
    device (the GPU with NCCL), or with ``host`` on the CPU (the gloo control group)."""
    ctx = current()
    if ctx.enabled:
        dist.all_reduce(values, group=ctx.control_group if host else None)
    return values


def all_reduce_flags(flags: list[int]) -> list[int]:
    """Element-wise maximum of small host-side integers over ranks (one CPU collective)."""
    ctx = current()
    if not ctx.enabled:
        return flags
    # A process group a library user made with NCCL alone needs the message on the GPU.
    on_gpu = ctx.control_group is None and dist.get_backend() == "nccl"
    message = torch.tensor(flags, dtype=torch.int64, device="cuda" if on_gpu else "cpu")
    dist.all_reduce(message, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return message.tolist()


def broadcast_module(module: torch.nn.Module, parameters: bool = True) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) and, with ``parameters``, its
    weights: the start of training, and before a sharded validation."""
    if not current().enabled:
        return
    tensors = [*module.parameters(), *module.buffers()] if parameters else list(module.buffers())
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[torch.Tensor], used: list[int]) -> None:
    """Mean over ranks of the gradients of ``params``, in one flat all-reduce per dtype.

    ``used[i]``: whether any rank gave ``params[i]`` a gradient (from :func:`all_reduce_flags`).
    A rank without a gradient for a used parameter contributes zeros; an unused one keeps None.
    """
    world = current().world_size
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, u in zip(params, used):
        if u:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view(g.shape))
            offset += g.numel()


def average_gradients_of(params: list[torch.Tensor]) -> None:
    """:func:`average_gradients` for a step outside ``train`` (e.g. the policy's during joint
    fine-tuning): the has-a-gradient flags travel in one host message first. No-op in one process."""
    if current().enabled:
        average_gradients(params, all_reduce_flags([int(p.grad is not None) for p in params]))


def check_same_on_all_ranks(module: torch.nn.Module, what: str) -> None:
    """Raise if ``module``'s parameters differ between ranks (checked through two sums per rank:
    of the values and of the values weighted by position), e.g. after training that must keep
    every rank's copy identical. No-op in one process."""
    ctx = current()
    if not ctx.enabled:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in module.parameters()])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(9973).add_(1)
        local = torch.stack([flat.sum(), (flat * weights).sum()])
    high, low = local.clone(), -local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=ctx.control_group)
    dist.all_reduce(low, op=dist.ReduceOp.MAX, group=ctx.control_group)
    if not torch.equal(high, -low):
        raise DyndepthError(f"the ranks' copies of {what} diverged (checksums {high.tolist()} vs {(-low).tolist()})")


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only (e.g. preparing the run directory); the other ranks wait and get
    its result, and a ``DyndepthError`` there is raised on every rank (marked, so that only rank 0
    prints it)."""
    ctx = current()
    if not ctx.enabled:
        return fn()
    outcome: list[Any] = [None]
    if ctx.is_main:
        try:
            outcome = [("ok", fn())]
        except DyndepthError as exc:
            outcome = [("error", type(exc).__name__, str(exc))]
            dist.broadcast_object_list(outcome, src=0, group=ctx.control_group)
            raise
    dist.broadcast_object_list(outcome, src=0, group=ctx.control_group)
    if outcome[0][0] == "ok":
        return outcome[0][1]
    _, name, message = outcome[0]
    error = getattr(errors, name, None) or (LaunchError if name == "LaunchError" else DyndepthError)
    exc = error(message)
    exc.reported_on_main = True
    raise exc


def check_batch_divisible(batch_size: int, world_size: int, what: str = "batch_size") -> int:
    """The per-rank batch of a global ``batch_size``; a size the ranks cannot share is an error."""
    if batch_size % world_size:
        raise ConfigError(
            f"{what} {batch_size} (the global batch) is not divisible by the {world_size} processes of this "
            f"torchrun job: choose a multiple of {world_size} or another --nproc_per_node")
    return batch_size // world_size
