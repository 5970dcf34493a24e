"""ThreeTowers: the towers, their heads and the objective, for the modes clip, lit and 3t.

Images passed to the model follow ``model.image_preprocessing``: the image tower f's in clip
and 3t, the third tower h's in lit (where h *is* the image tower). h's own input is, in order
of preference: precomputed ``third_features``, ``third_images`` prepared with h's own
preprocessing, or a view derived from ``images`` (undo f's normalisation, resize, apply h's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.model.losses import MODES, ThreeTowersLoss

HEAD_KINDS = ("linear", "mlp", "identity")


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
    """f (image, trained), g (text, trained), h (frozen third tower) with heads W_f, W_g,
    W_fh, W_gh, W_h and the objective of ``mode``. In clip mode h is never built or run; in
    lit mode f is absent."""

    def __init__(
        self,
        mode: str,
        text_tower: nn.Module,
        embed_dim: int,
        objective: ThreeTowersLoss,
        image_tower: nn.Module | None = None,
        image_preprocessing: Preprocessing | None = None,
        third_tower: FrozenBackbone | None = None,
        head: str = "linear",
        third_head: str = "linear",
        share_alignment_heads: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        uses_f, uses_h = mode in ("clip", "3t"), mode in ("lit", "3t")
        if uses_f and (image_tower is None or image_preprocessing is None):
            raise ValueError(f"mode {mode!r} needs an image tower and its preprocessing")
        if uses_h and not isinstance(third_tower, FrozenBackbone):
            raise ValueError(
                f"mode {mode!r} needs a third tower wrapped as FrozenBackbone(module, "
                "preprocessing) so that it is frozen and declares its input"
            )
        self.mode = mode
        self.embed_dim = embed_dim
        self.image_tower = image_tower if uses_f else None
        self.text_tower = text_tower
        self.third_tower = third_tower if uses_h else None
        self.image_preprocessing = image_preprocessing if uses_f else third_tower.preprocessing
        self.objective = objective

        heads = {"g": make_head(head, _feature_dim(text_tower, "text"), embed_dim)}
        if uses_f:
            heads["f"] = make_head(head, _feature_dim(image_tower, "image"), embed_dim)
        if uses_h:
            heads["h"] = make_head(third_head, third_tower.feature_dim, embed_dim)
        if mode == "3t" and not share_alignment_heads:
            heads["fh"] = make_head(head, _feature_dim(image_tower, "image"), embed_dim)
            heads["gh"] = make_head(head, _feature_dim(text_tower, "text"), embed_dim)
        self.heads = nn.ModuleDict(heads)
        self.share_alignment_heads = share_alignment_heads

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: everything except the frozen third tower."""
        return [p for p in self.parameters() if p.requires_grad]

    def _embed(self, head: str, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.heads[head](features), dim=-1)

    def third_features(
        self,
        images: torch.Tensor | None,
        third_features: torch.Tensor | None = None,
        third_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h's pooled features p, from the cheapest input given."""
        if third_features is not None:
            if third_features.shape[-1] != self.third_tower.feature_dim:
                raise ValueError(
                    f"third_features have dim {third_features.shape[-1]} but the third tower "
                    f"{self.third_tower.name!r} gives {self.third_tower.feature_dim}; the feature "
                    "cache was made with another backbone"
                )
            return third_features
        if third_images is None:
            if images is None:
                raise ValueError("pass images, third_images or third_features for the third tower")
            third_images = self._third_view(images)
        return self.third_tower(third_images)

    def _third_view(self, images: torch.Tensor) -> torch.Tensor:
        source, target = self.image_preprocessing, self.third_tower.preprocessing
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
        third_features: torch.Tensor | None = None,
        third_images: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every image-side embedding of this mode: z_f, z_fh (clip/3t) and z_h (lit/3t)."""
        out = {}
        if self.image_tower is not None:
            image = self.image_tower(images)
            out["z_f"] = self._embed("f", image)
            if self.mode == "3t":
                shared = self.share_alignment_heads
                out["z_fh"] = out["z_f"] if shared else self._embed("fh", image)
        if self.third_tower is not None:
            out["z_h"] = self._embed("h", self.third_features(images, third_features, third_images))
        return out

    def text_embeddings(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every text-side embedding of this mode: z_g, and z_gh in 3t."""
        text = self.text_tower(tokens)
        out = {"z_g": self._embed("g", text)}
        if self.mode == "3t":
            out["z_gh"] = out["z_g"] if self.share_alignment_heads else self._embed("gh", text)
        return out

    def forward(
        self,
        images: torch.Tensor | None,
        tokens: torch.Tensor,
        third_features: torch.Tensor | None = None,
        third_images: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Normalised embeddings: z_f, z_g (clip); z_h, z_g (lit); all five (3t).

        In lit mode with ``third_features`` given, ``images`` may be None.
        """
        return self.text_embeddings(tokens) | self.image_embeddings(
            images, third_features, third_images
        )

    def loss(
        self, out: dict[str, torch.Tensor], counts: list[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, logs) of this mode's objective; see ``ThreeTowersLoss`` (and its
        ``counts``, every rank's batch size under torch.distributed)."""
        return self.objective(out, counts)

    def _check_alpha(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if alpha < 1.0 and self.mode != "3t":
            raise ValueError(
                f"alpha < 1 mixes in the third tower's pair and needs a 3t model, not {self.mode!r}"
            )

    def encode_image(
        self,
        images: torch.Tensor | None,
        alpha: float = 1.0,
        third_features: torch.Tensor | None = None,
        third_images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The image embedding: z_f (z_h in lit). For alpha < 1 (3t only) the concatenation
        [√α z_f ; √(1−α) z_h], whose dot product with ``encode_text(t, alpha)`` is the
        α-mixed score α⟨z_f, z_g⟩ + (1−α)⟨z_h, z_gh⟩."""
        self._check_alpha(alpha)
        if self.mode == "lit":
            return self._embed("h", self.third_features(images, third_features, third_images))
        if alpha == 1.0:
            return self._embed("f", self.image_tower(images))
        z_h = self._embed("h", self.third_features(images, third_features, third_images))
        if alpha == 0.0:
            z_f = torch.zeros_like(z_h)
        else:
            z_f = self._embed("f", self.image_tower(images))
        return torch.cat([math.sqrt(alpha) * z_f, math.sqrt(1 - alpha) * z_h], dim=-1)

    def encode_text(self, tokens: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """The text embedding z_g; for alpha < 1 (3t only) [√α z_g ; √(1−α) z_gh]."""
        self._check_alpha(alpha)
        text = self.text_tower(tokens)
        z_g = self._embed("g", text)
        if alpha == 1.0:
            return z_g
        z_gh = z_g if self.share_alignment_heads else self._embed("gh", text)
        return torch.cat([math.sqrt(alpha) * z_g, math.sqrt(1 - alpha) * z_gh], dim=-1)
