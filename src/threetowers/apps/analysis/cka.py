"""Linear centred kernel alignment (Kornblith et al., 2019) between two embeddings of the
same samples: 1 when one is a rotation and scaling of the other, near 0 when unrelated."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA of ``x`` (n, d1) and ``y`` (n, d2), rows the same samples, in float64:
    ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F) with each column centred. The feature-space
    form costs O(n d²) instead of the n x n Gram matrices of the definition."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))
