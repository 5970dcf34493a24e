"""The image tower f: a Vision Transformer trained from scratch."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from threetowers.towers.transformer import Encoder, check_heads

ImagePool = Literal["cls", "gap", "map"]
IMAGE_POOLS: tuple[str, ...] = get_args(ImagePool)


def check_vit_shape(
    image_size: int, patch_size: int, width: int, heads: int, pool: str, class_token: bool | None
) -> None:
    """The one check of a ViT's settings, called by the tower and by the config's validator
    (so a Python user and a config user read the same message)."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    check_heads(width, heads)
    if pool not in IMAGE_POOLS:
        raise ValueError(f"image pool must be one of {IMAGE_POOLS}, got {pool!r}")
    if class_token is not None and class_token != (pool == "cls") and pool != "gap":
        raise ValueError(
            f"class_token {class_token} does not go with pool {pool!r}: cls pooling needs the "
            "class token, map pooling has none; only gap takes either"
        )


class AttentionPool(nn.Module):
    """Multi-head attention pooling with one learned query (big_vision's MAP head)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        nn.init.normal_(self.probe, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        head_dim = width // self.heads
        q = self.q(self.probe).view(1, 1, self.heads, head_dim).transpose(1, 2)
        k, v = self.kv(tokens).view(batch, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(q.expand(batch, -1, -1, -1), k, v)
        pooled = self.out(pooled.transpose(1, 2).reshape(batch, width))
        return pooled + self.mlp(self.norm(pooled))


class VisionTransformer(nn.Module):
    """Patchify, add learned positions, pre-LN Transformer, final LayerNorm, pool.

    ``pool``: ``cls`` (a class token), ``gap`` (mean over patches) or ``map`` (attention
    pooling). ``class_token`` (None: only for ``cls``) adds a class token to ``gap`` too: it
    takes part in attention but not in the mean, which is how OpenCLIP's ViT pools ``avg``
    (its class token is always there), so only such a gap tower exports to it exactly.
    Output: (B, width) pooled features.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        pool: str = "gap",
        class_token: bool | None = None,
    ) -> None:
        super().__init__()
        check_vit_shape(image_size, patch_size, width, heads, pool, class_token)
        class_token = pool == "cls" if class_token is None else class_token
        self.pool = pool
        self.feature_dim = width
        num_patches = (image_size // patch_size) ** 2
        self.patch_size = patch_size
        # A Conv2d's parameters (the usual checkpoint layout); see ``_patchify`` for its use.
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        num_tokens = num_patches + (1 if class_token else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.encoder = Encoder(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.attention_pool = AttentionPool(width, heads, mlp_ratio) if pool == "map" else None

    def _patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, patches, width): the patch convolution as one matmul over
        flattened patches, in the conv weight's (channel, row, column) order. Same function;
        on CPU its forward and backward cost ~20% less than the strided convolution's."""
        batch, channels, height, width = images.shape
        size = self.patch_size
        patches = (
            images.reshape(batch, channels, height // size, size, width // size, size)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, (height // size) * (width // size), channels * size * size)
        )
        return F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self._patchify(images)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = self.norm(self.encoder(tokens + self.pos_embed))
        if self.pool == "cls":
            return tokens[:, 0]
        if self.pool == "gap":
            return tokens[:, 0 if self.cls_token is None else 1 :].mean(dim=1)
        return self.attention_pool(tokens)
