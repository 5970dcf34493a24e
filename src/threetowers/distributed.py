"""Rank information and the differentiable all-gather used by the contrastive losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``local`` (B, D) from every rank, in rank order, keeping the autograd graph.

    Returns the global batch and the offset of this rank's rows in it. The backward of the
    gather sums the gradients that every rank sends to this rank's rows; see
    ``losses.py`` for why that, together with DDP's gradient averaging, is exact. Every rank
    must hold the same local batch size (train with drop_last).
    """
    size = world_size()
    if size == 1:
        return local, 0
    parts = dist_fn.all_gather(local.contiguous())
    return torch.cat(parts, dim=0), rank() * local.shape[0]
