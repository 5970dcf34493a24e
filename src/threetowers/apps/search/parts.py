"""Which embeddings an index keeps per image and caption, and how a query weights them.

An index row is the concatenation [x_f ; x_k ; ...] of the image's embedding parts,
unweighted: z_f and, for 3T, each aligned frozen tower's side of its pair and each frozen
pair's own image embedding (u_pimg, of the pair's width, not embed_dim). A query is the
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
    names: tuple[str, ...]  # the mixture's parts: "f", each aligned frozen tower, each pair
    image: tuple[str, ...]  # the image-side embedding of each part
    text: tuple[str, ...]  # the text-side embedding of each part
    dims: tuple[int, ...]  # each part's width: embed_dim, a frozen pair's own for its part

    @classmethod
    def of(cls, model: ThreeTowers) -> Parts:
        mixture = Mixture.of(model) if model.image_tower is not None else None
        if mixture is None:  # clip, lit: the deployed pair alone
            image, text = (model.image_key,), (model.structure.text_key,)
            return cls(("f",), image, text, (model.embed_dim,))
        names = ("f", *mixture.parts)
        dims = model.part_dims()
        return cls(names, mixture.image_parts, mixture.text_parts, tuple(dims[n] for n in names))

    @property
    def dim(self) -> int:
        """The main pair's width (the model's embed_dim): the manifest's ``part_dim``."""
        return self.dims[0]

    @property
    def width(self) -> int:
        """An index row's width: every part's, together."""
        return sum(self.dims)

    @property
    def mixes(self) -> bool:
        return len(self.names) > 1

    def row(self, embeddings: Mapping[str, torch.Tensor], side: str) -> np.ndarray:
        """The unweighted concatenation of one side's parts (rows: images or captions)."""
        keys = self.image if side == "image" else self.text
        return torch.cat([embeddings[key].float() for key in keys], dim=-1).numpy()

    def weighted(self, rows: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
        return weighted(rows, self.names, self.dims, weights)

    def sample_weights(self) -> list[dict[str, float]]:
        """Weights at which the index's recall is measured: the main pair alone, and for 3T
        an even mixture and each other part alone."""
        if not self.mixes:
            return [{"f": 1.0}]
        even = {name: 1.0 / len(self.names) for name in self.names}
        return [{"f": 1.0}, even, *({name: 1.0} for name in self.names[1:])]


def weighted(
    rows: np.ndarray, names: Sequence[str], dims: Sequence[int], weights: Mapping[str, float]
) -> np.ndarray:
    """``rows`` (parts ``names`` of widths ``dims``, concatenated) with part p scaled by its
    weight a_p (0 where ``weights`` lacks it): queries, whose inner product with an index
    row is the mixed score."""
    scale = np.repeat([weights.get(name, 0.0) for name in names], dims).astype(np.float32)
    return (np.asarray(rows, np.float32) * scale).astype(np.float32)
