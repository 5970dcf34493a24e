"""Which embeddings an index keeps per image and caption, and how a query weights them.

An index row is the concatenation [x_f ; x_k ; ...] of the image's embedding parts,
unweighted: z_f and, for 3T, each aligned frozen tower's side of its pair. A query is the
concatenation [a_f y_f ; a_k y_k ; ...] of its own parts times the mixture weights, so the
inner product is 3T's convex combination Σ_p a_p⟨x_p, y_p⟩ at any weights, and alpha can
change at query time without embedding anything again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from threetowers.evaluation.mixture import Mixture
from threetowers.model.three_towers import ThreeTowers


@dataclass(frozen=True)
class Parts:
    names: tuple[str, ...]  # the mixture's parts: "f", then each aligned frozen tower
    image: tuple[str, ...]  # the image-side embedding of each part
    text: tuple[str, ...]  # the text-side embedding of each part
    dim: int  # every part's width (they share the model's embed_dim)

    @classmethod
    def of(cls, model: ThreeTowers) -> Parts:
        mixture = Mixture.of(model) if model.image_tower is not None else None
        if mixture is None:  # clip, lit: the deployed pair alone
            image, text = (model.image_key,), (model.structure.text_key,)
            return cls(("f",), image, text, model.embed_dim)
        names = ("f", *mixture.towers)
        return cls(names, mixture.image_parts, mixture.text_parts, model.embed_dim)

    @property
    def mixes(self) -> bool:
        return len(self.names) > 1

    def row(self, embeddings: Mapping[str, torch.Tensor], side: str) -> np.ndarray:
        """The unweighted concatenation of one side's parts (rows: images or captions)."""
        keys = self.image if side == "image" else self.text
        return torch.cat([embeddings[key].float() for key in keys], dim=-1).numpy()

    def weighted(self, rows: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
        return weighted(rows, self.names, self.dim, weights)

    def sample_weights(self) -> list[dict[str, float]]:
        """Weights at which the index's recall is measured: the main pair alone, and for 3T
        an even mixture and each frozen tower's pair alone."""
        if not self.mixes:
            return [{"f": 1.0}]
        even = {name: 1.0 / len(self.names) for name in self.names}
        return [{"f": 1.0}, even, *({name: 1.0} for name in self.names[1:])]


def weighted(
    rows: np.ndarray, names: Sequence[str], dim: int, weights: Mapping[str, float]
) -> np.ndarray:
    """``rows`` (parts ``names`` of ``dim`` each, concatenated) with part p scaled by its
    weight a_p (0 where ``weights`` lacks it): queries, whose inner product with an index
    row is the mixed score."""
    scale = np.repeat([weights.get(name, 0.0) for name in names], dim).astype(np.float32)
    return (np.asarray(rows, np.float32) * scale).astype(np.float32)
