"""torchrun set-up, rank information, the collectives the training loop and losses use, and
the ranks' meeting after long phases (:func:`meet`), apart from the training collectives.

Every helper is a no-op returning the local value in a single process, so one code path
serves both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

# The training process group's timeout, which its collectives (the step's, the stream's)
# wait under: a rank that hangs or is lost fails the job in minutes. What takes longer than
# a step (a start, the caches, an evaluation, a checkpoint) waits in meet() instead.
TIMEOUT = timedelta(minutes=10)
# The long phases' timeout (meet): building the world, the tokenizer, the feature caches and
# the preloaded pixels take as long as the data is large. Effectively none: a rank that dies
# ends the job through torchrun, which stops the others, not through this timeout.
LONG_PHASE_TIMEOUT = timedelta(days=30)


_ALONE = ContextVar("alone", default=False)  # set by alone()


def world_size() -> int:
    if _ALONE.get() or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    if _ALONE.get() or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank()


def is_main() -> bool:
    return rank() == 0


@contextmanager
def alone() -> Iterator[None]:
    """This rank works as one process in the block: every helper here acts as without
    torchrun (rank 0's evaluation, while the others wait in :func:`meet`, takes its
    validation loss on its own batch, with no collective)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def local_batch_size(global_batch: int) -> int:
    """This rank's share of ``data.batch_size``, which is the global batch."""
    if global_batch % world_size():
        from threetowers.config import ConfigError  # here: config imports much of the library

        raise ConfigError(
            f"data.batch_size={global_batch} is the global batch and must split evenly over "
            f"the {world_size()} ranks; use a multiple of {world_size()}"
        )
    return global_batch // world_size()


def launched_world_size() -> int:
    """How many processes the launcher (torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher numbered it, also outside the process group."""
    return int(os.environ.get("RANK", "0"))


def local_device(device: torch.device) -> torch.device:
    """A torchrun rank's own GPU (LOCAL_RANK); other devices are left as they are."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device: auto is the GPU where one is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from threetowers.config import ConfigError  # here: config imports much of the library

        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto")
    return torch.device(name)


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes: NCCL on CUDA, gloo on CPU.

    Returns whether this call created it (and so should destroy it); False in a single
    process or when the caller already initialised a group.
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return True


_LONG_PHASES: dict[str, Any] = {}  # long_phase_group's, made per process group


def meet() -> None:
    """Wait for every rank, however long the slowest takes: the barrier of the long phases
    (a start, a cache build, an evaluation, a checkpoint), on a gloo group of its own whose
    timeout is :data:`LONG_PHASE_TIMEOUT`, never under a training collective's :data:`TIMEOUT`."""
    if world_size() > 1:
        dist.barrier(group=long_phase_group())


def long_phase_group():
    """The gloo group of the long phases (made by every rank's first call, per process
    group); None in one process."""
    if world_size() == 1:
        return None
    world = dist.group.WORLD
    if _LONG_PHASES.get("world") is not world:  # every rank's first call is the same call
        group = dist.new_group(backend="gloo", timeout=LONG_PHASE_TIMEOUT)
        _LONG_PHASES.update(world=world, group=group)
    return _LONG_PHASES["group"]


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it creates the shared files: run directory, world,
    tokenizer), then the other ranks run it and find them; nobody leaves before all are done.
    The ranks wait through :func:`meet`, as long as the block takes."""
    if world_size() == 1:
        yield
        return
    if not is_main():
        meet()
    yield
    if is_main():
        meet()
    meet()


def all_gather_objects(local: Any) -> list[Any]:
    """Every rank's picklable ``local``, in rank order."""
    if world_size() == 1:
        return [local]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, local)
    return out


def all_gather_ints(local: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``local`` numbers (of one length on every rank), in rank order: one
    tensor collective, on the GPU under NCCL."""
    if world_size() == 1:
        return [local]
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(local, dtype=torch.int64, device=where)
    every = torch.empty(world_size() * len(local), dtype=torch.int64, device=where)
    dist.all_gather_into_tensor(every, mine)
    return every.view(-1, len(local)).tolist()


def average_gradients(parameters) -> None:
    """Each parameter's gradient averaged over the ranks, as DDP averages those it holds."""
    if world_size() == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world_size()


def all_ranks(flag: torch.Tensor) -> bool:
    """Whether a boolean tensor is true on every rank (one host sync)."""
    if world_size() > 1:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each scalar averaged over the ranks (the global loss from the ranks' shares)."""
    if world_size() == 1 or not values:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / world_size(), strict=True))


def row_counts(rows: int, device: torch.device) -> list[int]:
    """Every rank's local batch size, in rank order."""
    if world_size() == 1:
        return [rows]
    local = torch.tensor([rows], device=device)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return [int(part) for part in parts]


def gather_with_grad(
    local: torch.Tensor, counts: list[int] | None = None
) -> tuple[torch.Tensor, int]:
    """Concatenate ``local`` (B_r, D) from every rank, in rank order, keeping the autograd
    graph.

    Returns the global batch and the offset of this rank's rows in it. The backward of the
    gather sums the gradients that every rank sends to this rank's rows; see ``losses.py``
    for why that, together with DDP's gradient averaging, is exact. Ranks may hold different
    numbers of rows (bad samples leave batches): ``counts`` (from :func:`row_counts`, which
    is called when it is None) gives each rank's; shorter parts are padded for the
    collective and the padding is cut out again.
    """
    size = world_size()
    if size == 1:
        return local, 0
    if counts is None:
        counts = row_counts(local.shape[0], local.device)
    most = max(counts)
    padded = F.pad(local, (0, 0, 0, most - local.shape[0])) if local.shape[0] < most else local
    parts = dist_fn.all_gather(padded.contiguous())
    rows = [part[:count] for part, count in zip(parts, counts, strict=True)]
    return torch.cat(rows, dim=0), sum(counts[: rank()])
