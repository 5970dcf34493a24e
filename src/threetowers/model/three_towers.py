"""ThreeTowers: the trained towers f and g, a list of frozen towers, their heads and the
loss (see ``model/objective.py`` for the structure each mode builds).

Images passed to the model follow ``model.image_preprocessing``: f's in clip and 3t, the
locked frozen tower's in lit. A frozen tower k reads, in order of preference: precomputed
``frozen_features[k]``, ``frozen_images[k]`` prepared with its own preprocessing, or a view
derived from ``images`` (undo f's normalisation, resize, apply k's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.model.combination import concatenate, mixture_weights
from threetowers.model.legacy_keys import rename_legacy_keys
from threetowers.model.losses import ThreeTowersLoss
from threetowers.model.objective import (
    Z_F,
    Z_G,
    Structure,
    alignment_names,
    embedding,
    own_embedding,
    pair_sides,
)

HeadKind = Literal["linear", "mlp"]  # the trained towers' heads (and those aligned with k)
FrozenHeadKind = Literal[HeadKind, "identity"]  # W_k may pass matching features through
HEAD_KINDS: tuple[str, ...] = get_args(FrozenHeadKind)
Tensors = Mapping[str, torch.Tensor]


def make_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """A projection into the shared embedding space (METHOD.md's W)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(
                f"an identity head needs matching dims, got features {in_dim} vs embed_dim "
                f"{out_dim}; use a linear head"
            )
        return nn.Identity()
    raise ValueError(f"unknown head kind {kind!r}; choose one of {HEAD_KINDS}")


def _feature_dim(tower: nn.Module, which: str) -> int:
    dim = getattr(tower, "feature_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"the {which} tower must expose an integer attribute feature_dim")
    return dim


class ThreeTowers(nn.Module):
    """f (image, trained), g (text, trained) and frozen towers k with heads W_f, W_g, W_k,
    W_f->k, W_g->k, and ``loss_fn``, the loss of ``structure``'s terms (a module: it holds
    the learned scales and biases). A clip model has no frozen tower; a lit model has no f
    (its one frozen tower is the image tower)."""

    def __init__(
        self,
        structure: Structure,
        text_tower: nn.Module | None,
        embed_dim: int,
        loss_fn: ThreeTowersLoss,
        image_tower: nn.Module | None = None,
        image_preprocessing: Preprocessing | None = None,
        frozen: Mapping[str, FrozenBackbone] | None = None,
        head: str = "linear",
        frozen_heads: Mapping[str, str] | None = None,
        share_alignment_heads: bool = False,
    ) -> None:
        super().__init__()
        frozen = dict(frozen or {})
        if structure.trains_image_tower and (image_tower is None or image_preprocessing is None):
            raise ValueError(f"mode {structure.mode!r} needs an image tower and its preprocessing")
        if structure.trains_text_tower and text_tower is None:
            raise ValueError(f"mode {structure.mode!r} needs a text tower")
        if sorted(frozen) != sorted(structure.frozen):
            raise ValueError(
                f"mode {structure.mode!r} runs the frozen towers {list(structure.frozen)}, "
                f"got {list(frozen)}"
            )
        for name, tower in frozen.items():
            if name in structure.text and not isinstance(tower, FrozenTextEncoder):
                raise ValueError(f"frozen text tower {name!r} must be a FrozenTextEncoder")
            if name not in structure.text and not isinstance(tower, FrozenBackbone):
                raise ValueError(
                    f"frozen tower {name!r} must be wrapped as FrozenBackbone(module, "
                    "preprocessing) so that it is frozen and declares its input"
                )
        for pair in structure.pairs:
            image_side, text_side = (frozen[side] for side in pair_sides(pair))
            if image_side.feature_dim != text_side.feature_dim:
                raise ValueError(
                    f"frozen pair {pair!r}: its sides must share a space, but its image side gives "
                    f"{image_side.feature_dim} dims and its text side {text_side.feature_dim}"
                )
        self.structure = structure
        self.embed_dim = embed_dim
        # Registration order (f, g, frozen, loss_fn, heads) fixes the parameter order, which
        # optimizer states in checkpoints are indexed by: it is the order of the one-tower model.
        self.image_tower = image_tower if structure.trains_image_tower else None
        self.text_tower = text_tower if structure.trains_text_tower else None
        self.frozen = nn.ModuleDict({name: frozen[name] for name in structure.frozen})
        if structure.trains_image_tower:
            self.image_preprocessing = image_preprocessing
        else:
            self.image_preprocessing = self.frozen[structure.frozen[0]].preprocessing
        self.loss_fn = loss_fn
        self.share_alignment_heads = share_alignment_heads

        kinds = dict(frozen_heads or {})
        heads = {}
        if self.text_tower is not None:
            heads["g"] = make_head(head, _feature_dim(text_tower, "text"), embed_dim)
        if self.image_tower is not None:
            heads["f"] = make_head(head, _feature_dim(image_tower, "image"), embed_dim)
        for name, tower in self.frozen.items():
            heads[name] = make_head(kinds.get(name, "linear"), tower.feature_dim, embed_dim)
        if not share_alignment_heads:
            for name in structure.aligned:
                on_f, on_g = alignment_names(name)
                heads[on_f] = make_head(head, _feature_dim(image_tower, "image"), embed_dim)
                heads[on_g] = make_head(head, _feature_dim(text_tower, "text"), embed_dim)
        self.heads = nn.ModuleDict(heads)
        self._register_load_state_dict_pre_hook(rename_legacy_keys)

    @property
    def mode(self) -> str:
        return self.structure.mode

    @property
    def image_key(self) -> str:
        """The embedding that stands for an image at deployment: z_f, or the locked tower's."""
        return self.structure.image_key

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: everything except the frozen towers."""
        return [p for p in self.parameters() if p.requires_grad]

    def _embed(self, head: str, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.heads[head](features), dim=-1)

    def frozen_tower_features(
        self,
        name: str,
        images: torch.Tensor | None,
        features: Tensors | None = None,
        frozen_images: Tensors | None = None,
        captions: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Frozen tower ``name``'s pooled features p_k, from the cheapest input given (a
        text tower: given features, or the ``captions``)."""
        tower = self.frozen[name]
        if features is not None and name in features:
            given = features[name]
            if given.shape[-1] != tower.feature_dim:
                raise ValueError(
                    f"features of frozen tower {name!r} have dim {given.shape[-1]} but "
                    f"{tower.name!r} gives {tower.feature_dim}; the feature cache was made "
                    "with another backbone"
                )
            return given
        if name in self.structure.text:
            if captions is None:
                raise ValueError(
                    f"pass captions or frozen_features[{name!r}] for text tower {name!r}"
                )
            return tower(list(captions))
        view = frozen_images.get(name) if frozen_images is not None else None
        if view is None:
            if images is None:
                raise ValueError(
                    f"pass images, frozen_images[{name!r}] or frozen_features[{name!r}] for "
                    f"frozen tower {name!r}"
                )
            view = self._frozen_view(tower.preprocessing, images)
        return tower(view)

    def frozen_features(
        self,
        images: torch.Tensor | None,
        features: Tensors | None = None,
        frozen_images: Tensors | None = None,
        captions: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every frozen tower's features, by name (those in ``features`` as given)."""
        return {
            name: self.frozen_tower_features(name, images, features, frozen_images, captions)
            for name in self.frozen
        }

    def _frozen_view(self, target: Preprocessing, images: torch.Tensor) -> torch.Tensor:
        source = self.image_preprocessing
        if source == target:
            return images
        mean = images.new_tensor(source.mean).view(1, 3, 1, 1)
        std = images.new_tensor(source.std).view(1, 3, 1, 1)
        pixels = images * std + mean
        if pixels.shape[-1] != target.image_size or pixels.shape[-2] != target.image_size:
            size = (target.image_size, target.image_size)
            mode = "bilinear" if target.resize == "nearest" else target.resize
            pixels = F.interpolate(pixels, size=size, mode=mode, antialias=True).clamp(0, 1)
        return target.normalize(pixels)

    def image_embeddings(
        self,
        images: torch.Tensor | None,
        frozen_features: Tensors | None = None,
        frozen_images: Tensors | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every image-side embedding: z_f and z_fk (f trained), z_k (each frozen tower)."""
        out = {}
        if self.image_tower is not None:
            image = self.image_tower(images)
            out[Z_F] = self._embed("f", image)
            for name in self.structure.aligned:
                on_f, _ = alignment_names(name)
                shared = self.share_alignment_heads
                out[embedding(on_f)] = out[Z_F] if shared else self._embed(on_f, image)
        for name in self.structure.image_towers:
            features = self.frozen_tower_features(name, images, frozen_features, frozen_images)
            out |= self._frozen_embeddings(name, features)
        return out

    def _frozen_embeddings(self, name: str, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """z_k of frozen tower ``name``, and u_k (its features normalised) for a pair's side."""
        out = {embedding(name): self._embed(name, features)}
        if self.structure.is_side(name):
            out[own_embedding(name)] = F.normalize(features, dim=-1)
        return out

    def text_embeddings(
        self,
        tokens: torch.Tensor,
        captions: Sequence[str] | None = None,
        frozen_features: Tensors | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every text-side embedding: z_g, z_gk for each aligned frozen tower, and z_t for
        each text tower (from ``frozen_features[t]`` or the ``captions`` themselves)."""
        out = {}
        if self.text_tower is not None:
            text = self.text_tower(tokens)
            out[Z_G] = self._embed("g", text)
            for name in self.structure.aligned:
                _, on_g = alignment_names(name)
                out[embedding(on_g)] = (
                    out[Z_G] if self.share_alignment_heads else self._embed(on_g, text)
                )
        for name in self.structure.text:
            features = self.frozen_tower_features(name, None, frozen_features, captions=captions)
            out |= self._frozen_embeddings(name, features)
        return out

    def forward(
        self,
        images: torch.Tensor | None,
        tokens: torch.Tensor,
        frozen_features: Tensors | None = None,
        frozen_images: Tensors | None = None,
        captions: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Normalised embeddings of both sides (see ``image_embeddings``, ``text_embeddings``).

        In lit mode with ``frozen_features`` given, ``images`` may be None; a text tower
        reads ``captions`` (the texts of ``tokens``) unless its features are given.
        """
        return self.text_embeddings(tokens, captions, frozen_features) | self.image_embeddings(
            images, frozen_features, frozen_images
        )

    def loss(
        self, out: dict[str, torch.Tensor], counts: list[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, logs) of ``loss_fn``; see ``ThreeTowersLoss`` (and its ``counts``, every
        rank's batch size under torch.distributed)."""
        return self.loss_fn(out, counts)

    def mixture(self, alpha: float | Mapping[str, float]) -> dict[str, float]:
        """The weights of the convex combination a_f⟨z_f, z_g⟩ + Σ_k a_k⟨z_k, z_gk⟩ +
        Σ_p a_p⟨u_pimg, u_ptxt⟩, by part (``f``, the aligned towers' names and the frozen
        pairs'; ``model/combination.py``)."""
        return mixture_weights(("f", *self.structure.parts), alpha, self.mode)

    def encode_image(
        self,
        images: torch.Tensor | None,
        alpha: float | Mapping[str, float] = 1.0,
        frozen_features: Tensors | None = None,
        frozen_images: Tensors | None = None,
    ) -> torch.Tensor:
        """The image embedding: z_f (the locked tower's in lit). With weight on frozen
        towers (3t only) the concatenation [√a_f z_f ; √a_k z_k ; ...] over f and every
        aligned tower, whose dot product with ``encode_text(t, alpha)`` is the mixed score;
        a part of weight 0 is zeros and its tower does not run."""
        weights = self.mixture(alpha)
        if self.image_tower is None:
            locked = self.structure.frozen[0]
            features = self.frozen_tower_features(locked, images, frozen_features, frozen_images)
            return self._embed(locked, features)
        if weights == {"f": 1.0}:
            return self._embed("f", self.image_tower(images))
        parts = {}
        # each frozen tower runs once, whichever parts read it
        frozen = cache(
            lambda name: self.frozen_tower_features(name, images, frozen_features, frozen_images)
        )
        image = (
            self.image_tower(images)
            if "f" in weights or set(weights) & set(self.structure.text)
            else None
        )
        if "f" in weights:
            parts["f"] = self._embed("f", image)
        for name in self.structure.aligned:
            if name not in weights:
                continue
            if name in self.structure.text:  # its pair's image side: W_f->t on f
                on_f, _ = alignment_names(name)
                parts[name] = self._embed("f" if self.share_alignment_heads else on_f, image)
            else:
                parts[name] = self._embed(name, frozen(name))
        for pair in self.structure.pairs:
            if pair in weights:  # the pair's own image embedding
                parts[pair] = F.normalize(frozen(pair_sides(pair)[0]), dim=-1)
        return concatenate(parts, weights, self.part_dims())

    def encode_text(
        self,
        tokens: torch.Tensor,
        alpha: float | Mapping[str, float] = 1.0,
        captions: Sequence[str] | None = None,
        frozen_features: Tensors | None = None,
    ):
        """The text embedding z_g; with weight on frozen towers (3t only) the concatenation
        [√a_f z_g ; √a_k z_gk ; √a_t z_t ; ...] matching ``encode_image`` (a text tower t
        embeds the ``captions`` themselves)."""
        weights = self.mixture(alpha)
        if self.text_tower is None:  # lit with a locked text tower: its own embedding
            locked = self.structure.frozen[0]
            features = self.frozen_tower_features(locked, None, frozen_features, captions=captions)
            return self._embed(locked, features)
        text = self.text_tower(tokens)
        z_g = self._embed("g", text)
        if weights == {"f": 1.0}:
            return z_g
        parts = {"f": z_g}
        frozen = cache(  # each text tower runs once, whichever parts read it
            lambda name: self.frozen_tower_features(name, None, frozen_features, captions=captions)
        )
        for name in self.structure.aligned:
            if name in self.structure.text:
                if name in weights:
                    parts[name] = self._embed(name, frozen(name))
                continue
            _, on_g = alignment_names(name)
            parts[name] = z_g if self.share_alignment_heads else self._embed(on_g, text)
        for pair in self.structure.pairs:
            if pair in weights:  # the pair's own text embedding
                parts[pair] = F.normalize(frozen(pair_sides(pair)[1]), dim=-1)
        return concatenate(parts, weights, self.part_dims())

    def part_dims(self) -> dict[str, int]:
        """Each part of the convex combination and its dimension, in order: embed_dim for
        the main pair and the aligned towers' pairs, a frozen pair's own for its score."""
        dims = dict.fromkeys(("f", *self.structure.aligned), self.embed_dim)
        for pair in self.structure.pairs:
            dims[pair] = self.frozen[pair_sides(pair)[0]].feature_dim
        return dims


def batch_embeddings(model: ThreeTowers, batch: dict, forward=None) -> dict[str, torch.Tensor]:
    """The embeddings of a prepared loader batch: the frozen towers without cached features
    run first, outside any wrapper; then ``forward`` (the model, or its DDP wrapper)."""
    frozen = model.frozen_features(
        batch.get("images"),
        batch.get("frozen_features"),
        batch.get("frozen_images"),
        batch["captions"],
    )
    return (forward or model)(batch.get("images"), batch["tokens"], frozen_features=frozen)
