"""torchrun set-up, rank information, and the collectives the training loop and losses use.

Every helper is a no-op returning the local value in a single process, so one code path
serves both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

# Rank 0 alone builds h's feature cache, preloads images and evaluates while the other
# ranks wait in a collective, so the wait is bounded generously; build large caches with
# `threetowers cache` before launching.
TIMEOUT = timedelta(hours=2)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


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


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it creates the shared files: tokenizer, caches, run
    directory), then the other ranks run it and find them; nobody leaves before all are done."""
    if world_size() == 1:
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
    barrier()


def all_gather_objects(local: Any) -> list[Any]:
    """Every rank's picklable ``local``, in rank order."""
    if world_size() == 1:
        return [local]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, local)
    return out


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
