"""3T's convex combination as one dot product: the weights of its parts, and a side's
parts concatenated, each scaled by the root of its weight (METHOD.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def mixture_weights(
    parts: tuple[str, ...], alpha: float | Mapping[str, float], mode: str
) -> dict[str, float]:
    """The weights of ``parts`` (``f`` first) in a model of ``mode``: from a float α (one
    other part: a_f = α, a_k = 1 − α) or a mapping of weights that sum to 1; only the
    parts of positive weight."""
    if not isinstance(alpha, Mapping):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if alpha == 1.0:
            return {"f": 1.0}
        if len(parts) == 1:
            raise ValueError(
                f"alpha < 1 mixes in the frozen towers' pairs and needs a 3t model, not {mode!r}"
            )
        if len(parts) > 2:
            example = ", ".join(f"{p!r}: ..." for p in parts)
            raise ValueError(
                f"with {len(parts) - 1} frozen towers one alpha is ambiguous: give a weight "
                f"per part, summing to 1: {{{example}}}"
            )
        return {"f": float(alpha), parts[1]: 1.0 - float(alpha)}
    weights = {str(k): float(v) for k, v in alpha.items()}
    unknown = sorted(set(weights) - set(parts))
    if unknown or any(not 0.0 <= w <= 1.0 for w in weights.values()):
        raise ValueError(f"mixture weights {weights} must be in [0, 1] and name only {list(parts)}")
    if not math.isclose(sum(weights.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"mixture weights must sum to 1, got {sum(weights.values())}")
    return {part: weights.get(part, 0.0) for part in parts if weights.get(part, 0.0) > 0}


def mix(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """[√w₁ x₁ ; √w₂ x₂ ; ...]: unit norm when the parts are and the weights sum to 1, and
    ⟨mix(xs, w), mix(ys, w)⟩ = Σᵢ wᵢ⟨xᵢ, yᵢ⟩ (3T's convex combination as one dot product)."""
    if len(parts) != len(weights) or any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"need one weight in [0, 1] per part, got {list(weights)}")
    return torch.cat([math.sqrt(w) * x for x, w in zip(parts, weights, strict=True)], dim=-1)


def concatenate(
    parts: Mapping[str, torch.Tensor], weights: Mapping[str, float], dims: Mapping[str, int]
) -> torch.Tensor:
    """:func:`mix` of the parts in ``dims``' order; a part of weight 0 (absent from
    ``weights``) is zeros of its dimension."""
    like = next(iter(parts.values()))
    pieces = [parts[p] if p in weights else like.new_zeros(len(like), d) for p, d in dims.items()]
    return mix(pieces, [weights.get(p, 0.0) for p in dims])
