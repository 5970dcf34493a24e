"""The pre-LayerNorm Transformer block shared by the image and the text tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def check_heads(width: int, heads: int) -> None:
    """Attention splits the width evenly over the heads (both towers' checks call this)."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        check_heads(width, heads)
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: boolean, broadcastable to (B, heads, L, L), True where attention is allowed."""
        batch, length, width = x.shape
        # Split along the projection's own layout, each a (B, heads, L, head width) view:
        # the gradients then gather straight into that layout, one copy fewer than a permute
        # to (3, B, heads, L, head width) costs in the backward pass (the same numbers).
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.checkpointed = False  # see checkpoint_blocks

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointed and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


def checkpoint_blocks(tower: nn.Module) -> None:
    """Activation checkpointing for every Transformer block of ``tower``: a block keeps only
    its input for the backward pass and computes its activations again there (the same
    operations, so the same numbers, with dropout's masks replayed), for one more forward."""
    for module in tower.modules():
        if isinstance(module, Encoder):
            module.checkpointed = True
