"""The one place for ``torch.distributed``: the process's rank/world, sharding, gathering and failure messages.

A heavy stage (``sample``, ``features``, ``train``, ``pca``) runs unchanged as one process or as ``N`` processes
started by ``torchrun`` (one per GPU with NCCL, or CPU processes with gloo). :func:`init_distributed` reads the
variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, plus ``MASTER_ADDR``/``MASTER_PORT`` for the
rendezvous) and returns a :class:`DistContext`; without them (or with ``WORLD_SIZE=1``) it is a no-op and every
helper here degrades to the single-process identity, so the single-process code path is the plain one.

Work is split in *rounds* of ``world × batch`` consecutive items: in round ``r`` rank ``k`` takes the block
``[start + (r·world + k)·batch, … + batch)`` (:func:`shard_indices` with ``block=batch``), so rank ``k``'s ``j``-th
batch is exactly the single-process run's batch ``j·world + k`` (same images per forward pass), and each round's
rows, gathered with :func:`gather_batch`, form one contiguous slice of the output in image order. Every rank
receives every round (an all-gather: NCCL has no gather to one rank on all versions), which keeps all ranks in
step and lets them all raise the same error on bad data instead of leaving a peer waiting.

Collectives run with a timeout (``timeout_s``); a peer that died or stopped answering turns into
:class:`DistributedError` (a :class:`NetVLADError`, so a stage prints ``error: rank N: …``) instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from .config import DEFAULT_TIMEOUT_S  # noqa: F401  (re-exported: the default lives in config)
from .errors import NetVLADError

T = TypeVar("T")

# Substrings of the messages gloo/NCCL/c10d put on a failed collective (used to tell them from other RuntimeErrors).
_COMMS_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "watchdog", "c10d", "socket", "peer",
                  "process group", "processgroup")


class DistributedError(NetVLADError):
    """A collective failed: another rank died, or did not reach it within the timeout. One-line message that
    starts with ``rank N:``."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. ``world_size == 1`` means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "nccl", "gloo", or None for a single process
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes artifacts, metrics, DVCLive files and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (collectives are real)."""
        return self.world_size > 1


def single_process(device: torch.device | str = "cpu") -> DistContext:
    """The context of a plain single-process run on ``device``."""
    return DistContext(device=torch.device(device))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise NetVLADError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun variables; ``(0, 1, 0)`` when they are unset."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise NetVLADError(f"inconsistent torchrun variables RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank}")
    return rank, world, local_rank


def _distributed_device(device_name: str, local_rank: int) -> torch.device:
    """The device of a rank: ``auto``/``cuda`` → ``cuda:LOCAL_RANK`` (one GPU per process), ``cpu`` → CPU."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device_name)
    except RuntimeError:
        raise NetVLADError(f"device {device_name!r} is not a valid torch device (use auto, cpu or cuda)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise NetVLADError(f"device {device_name!r}: multi-process runs support cpu (gloo) and cuda (NCCL) only")
    if not torch.cuda.is_available():
        raise NetVLADError(f"device {device_name!r} requested but CUDA is not available on this machine")
    if dev.index is not None:
        raise NetVLADError(f"device {device_name!r} would put every process on the same GPU; under torchrun use "
                           f"--device cuda (or auto): each process takes cuda:LOCAL_RANK")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise NetVLADError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count}; start at most {count} "
                           f"processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the torchrun job described by the environment, or return a single-process context.

    Single process (``WORLD_SIZE`` unset or 1): the device is :func:`netvlad_core.device.select_device`'s choice
    and nothing is initialised. Several processes: one GPU per process (``cuda:LOCAL_RANK``, NCCL) or CPU
    (gloo), a process group whose collectives time out after ``timeout_s`` seconds (a dead or stuck peer then
    raises instead of hanging). Call :func:`cleanup` at the end (or use :func:`distributed_session`).
    """
    from .device import select_device

    if not timeout_s > 0:
        raise NetVLADError(f"dist-timeout must be > 0 seconds, got {timeout_s}")
    rank, world, local_rank = env_ranks()
    if world == 1:
        return DistContext(device=select_device(device_name), timeout_s=float(timeout_s))
    import torch.distributed as dist

    if not dist.is_available():
        raise NetVLADError("this PyTorch build has no torch.distributed; run a single process")
    device = _distributed_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():  # e.g. a test harness that set the group up already
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise NetVLADError(f"a process group of {dist.get_world_size()} is already initialised but "
                               f"WORLD_SIZE={world}")
    else:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise NetVLADError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset: start the processes with "
                               f"torchrun (it sets them) or export them")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=float(timeout_s)))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {rank}: could not join the {world}-process group via "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                                   f"({_first_line(e)})") from None
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                       timeout_s=float(timeout_s))


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:400] if text else type(e).__name__


def is_comms_error(e: BaseException) -> bool:
    """Whether ``e`` looks like a failed collective (dead peer, timeout) rather than a bug in the computation."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COMMS_MARKERS)


def peer_failure(ctx: DistContext, what: str, e: BaseException) -> DistributedError:
    """The one-line error for a collective ``what`` that failed with ``e`` on this rank."""
    return DistributedError(f"rank {ctx.rank}: {what} failed: another of the {ctx.world_size} processes died or "
                            f"did not answer within {ctx.timeout_s:g} s (see its log; {_first_line(e)})")


@contextlib.contextmanager
def collective(ctx: DistContext, what: str) -> Iterator[None]:
    """Run the collective(s) in the block; any RuntimeError becomes :class:`DistributedError` naming ``what``."""
    try:
        yield
    except NetVLADError:
        raise
    except RuntimeError as e:
        raise peer_failure(ctx, what, e) from None


@contextlib.contextmanager
def distributed_session(device_name: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """:func:`init_distributed`, then :func:`cleanup` however the block ends; a communication failure escaping
    the block (e.g. from DistributedDataParallel's gradient all-reduce) becomes :class:`DistributedError`."""
    ctx = init_distributed(device_name, timeout_s)
    try:
        yield ctx
    except NetVLADError:
        raise
    except Exception as e:
        if ctx.enabled and is_comms_error(e):
            raise peer_failure(ctx, "a collective", e) from None
        raise
    finally:
        cleanup(ctx)


# --------------------------------------------------------------------------------------------------- sharding

def shard_indices(n: int, rank: int, world: int, *, block: int | None = None, start: int = 0) -> np.ndarray:
    """The items of ``range(start, n)`` that ``rank`` of ``world`` handles, ascending.

    ``block=None``: one contiguous slice per rank (sizes differ by at most one, like ``np.array_split``).
    ``block=b``: blocks of ``b`` consecutive items dealt round-robin (``b=1`` is strided), so rank ``k``'s
    ``j``-th block is global block ``j·world + k``. Every item belongs to exactly one rank; nothing is padded.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    if block is not None and block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    items = np.arange(start, max(n, start), dtype=np.int64)
    if block is None:
        return np.array_split(items, world)[rank]
    blocks = np.arange(len(items)) // block
    return items[blocks % world == rank]


def num_rounds(n: int, batch_size: int, world: int, start: int = 0) -> int:
    """Rounds of ``world × batch_size`` items needed to cover ``range(start, n)``."""
    return -(-max(n - start, 0) // (batch_size * world))


def pad_rounds(items: Iterator[T], rounds: int) -> Iterator[T | None]:
    """``items`` followed by ``None`` up to ``rounds`` in all: a rank with fewer batches still joins every round."""
    produced = 0
    for item in items:
        if produced >= rounds:
            raise RuntimeError("a rank produced more batches than there are rounds")  # a sharding bug
        yield item
        produced += 1
    for _ in range(rounds - produced):
        yield None


# ------------------------------------------------------------------------------------------------ collectives

def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def _all_gather(t: torch.Tensor, ctx: DistContext, what: str) -> list[torch.Tensor]:
    import torch.distributed as dist

    t = t.to(_comm_device(ctx)).contiguous()
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    with collective(ctx, what):
        dist.all_gather(parts, t)
    return [p.cpu() for p in parts]


def gather_batch(rows: np.ndarray | None, indices: np.ndarray | None, *, ctx: DistContext, capacity: int, dim: int,
                 what: str = "gathering descriptors") -> tuple[np.ndarray, np.ndarray]:
    """All ranks' ``(indices, rows)`` of one round, on every rank: indices ascending with duplicates dropped
    (the first copy is kept), rows float32 in that order. ``rows``/``indices`` may be ``None`` (this rank has no
    items this round); each rank sends at most ``capacity`` rows of width ``dim``. Single process: the input,
    sorted and de-duplicated the same way."""
    if rows is None or indices is None:
        rows, indices = np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    rows = np.asarray(rows, dtype=np.float32).reshape(len(indices), dim)
    indices = np.asarray(indices, dtype=np.int64)
    if not ctx.enabled:
        all_idx, all_rows = indices, rows
    else:
        if len(indices) > capacity:
            raise ValueError(f"rank {ctx.rank} sends {len(indices)} rows, capacity {capacity}")
        padded_rows = torch.zeros((capacity, dim), dtype=torch.float32)
        padded_idx = torch.full((capacity,), -1, dtype=torch.int64)
        padded_rows[:len(indices)] = torch.from_numpy(rows)
        padded_idx[:len(indices)] = torch.from_numpy(indices)
        all_idx = torch.cat(_all_gather(padded_idx, ctx, what)).numpy()
        all_rows = torch.cat(_all_gather(padded_rows, ctx, what)).numpy()
    valid = np.flatnonzero(all_idx >= 0)
    unique, first = np.unique(all_idx[valid], return_index=True)  # ascending, first copy of a padded duplicate
    return unique, all_rows[valid[first]]


def gather_rows(local_rows: np.ndarray, local_indices: np.ndarray, n: int, *, ctx: DistContext,
                dst: int | None = None, what: str = "gathering rows") -> np.ndarray | None:
    """The full ``(n, D)`` array from each rank's ``local_rows`` (rows of items ``local_indices``), in item order,
    duplicates (from padded samplers) dropped; on every rank (``dst=None``) or only on rank ``dst`` (the others
    get ``None``). Raises when some item of ``range(n)`` came from no rank. Keeps the rows' dtype."""
    local_rows = np.asarray(local_rows)
    local_indices = np.asarray(local_indices, dtype=np.int64)
    dim = int(local_rows.shape[1]) if local_rows.ndim == 2 else 0
    if ctx.enabled:
        import torch.distributed as dist

        sizes = torch.tensor([len(local_indices), dim], dtype=torch.int64, device=_comm_device(ctx))
        with collective(ctx, what):
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        capacity, dim = int(sizes[0]), int(sizes[1])
    else:
        capacity = len(local_indices)
    indices, rows = gather_batch(local_rows.reshape(len(local_indices), dim), local_indices, ctx=ctx,
                                 capacity=max(capacity, 1), dim=dim, what=what)
    if dst is not None and ctx.rank != dst:
        return None
    if len(indices) != n or (n and (indices[0] != 0 or indices[-1] != n - 1)):
        raise ValueError(f"gathered {len(indices)} distinct rows for {n} items")
    return rows.astype(local_rows.dtype, copy=False)


def barrier(ctx: DistContext, what: str = "waiting for the other processes") -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    with collective(ctx, what):
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0, what: str = "broadcasting state") -> Any:
    """``obj`` from rank ``src`` on every rank (pickled in memory by torch.distributed, never written to disk)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == src else None]
    with collective(ctx, what):
        dist.broadcast_object_list(box, src=src, device=_comm_device(ctx))
    return box[0]


def broadcast_module(module: torch.nn.Module, ctx: DistContext, src: int = 0) -> torch.nn.Module:
    """Copy ``src``'s parameters and buffers into ``module`` on every rank (e.g. after a random initialisation)."""
    if not ctx.enabled:
        return module
    import torch.distributed as dist

    with collective(ctx, "broadcasting the model weights"), torch.no_grad():
        for t in module.state_dict().values():
            if not t.numel():
                continue
            buf = t.detach().to(_comm_device(ctx), dtype=torch.uint8 if t.dtype == torch.bool else t.dtype)
            buf = buf.contiguous()
            dist.broadcast(buf, src=src)
            t.copy_(buf.to(t.device, dtype=t.dtype))
    return module


def all_reduce_sum(values: np.ndarray | float, ctx: DistContext, what: str = "summing") -> np.ndarray:
    """Element-wise sum over ranks, float64 (the input for a single process)."""
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if not ctx.enabled:
        return arr
    import torch.distributed as dist

    t = torch.from_numpy(arr.copy()).to(_comm_device(ctx))
    with collective(ctx, what):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def main_only(ctx: DistContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on rank 0 only; ``None`` elsewhere (no synchronisation)."""
    return fn(*args, **kwargs) if ctx.is_main else None


@contextlib.contextmanager
def local_main_first(ctx: DistContext) -> Iterator[None]:
    """Run the block on each node's local rank 0 first, then on the node's other ranks (e.g. so only one process
    per node downloads weights into the shared cache). Every rank must enter it."""
    if not ctx.enabled:
        yield
        return
    if ctx.local_rank != 0:
        barrier(ctx, "waiting for local rank 0")
    yield
    if ctx.local_rank == 0:
        barrier(ctx, "waiting for local rank 0")
