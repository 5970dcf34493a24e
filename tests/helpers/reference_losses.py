"""Independent float64 reference losses, written from METHOD.md's formulas."""

from __future__ import annotations

import torch


def reference_softmax(a, b, s):
    """½[mean_i(−s aᵢ·bᵢ + log Σⱼ exp s aᵢ·bⱼ) + the same with a and b swapped]."""
    sim = s * a @ b.T
    positives = torch.diagonal(sim)
    rows = (torch.logsumexp(sim, dim=1) - positives).mean()
    cols = (torch.logsumexp(sim, dim=0) - positives).mean()
    return (rows + cols) / 2
