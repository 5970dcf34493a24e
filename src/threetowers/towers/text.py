"""The text tower g: a Transformer over token ids, trained from scratch.

Captions are right-padded with ``pad_id``. Padding is masked out of attention and out of
pooling, so the embedding of a caption does not depend on how much padding follows it. On
CPU that allows running a batch in buckets of similar length (``length_buckets``): each bucket
is trimmed to its own longest caption, so short captions stop paying for the longest one's
padding (world captions run from 10 to 40 tokens, mean 18).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from threetowers.towers.transformer import Encoder, check_heads

TextPool = Literal["eot", "first", "mean"]
TEXT_POOLS: tuple[str, ...] = get_args(TextPool)
MIN_BUCKET = 32  # captions; smaller buckets cost more in per-call overhead than they save


def check_text_shape(
    vocab_size: int, width: int, heads: int, causal: bool, pool: str, pad_id: int
) -> None:
    """The one check of a text tower's settings, called by the tower and by the config's
    validator (so a Python user and a config user read the same message)."""
    check_heads(width, heads)
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the vocabulary (size {vocab_size})")
    if pool not in TEXT_POOLS:
        raise ValueError(f"text pool must be one of {TEXT_POOLS}, got {pool!r}")
    if causal and pool == "first":
        raise ValueError(
            "pool 'first' with causal attention sees only the first token; use pool 'eot' or "
            "'mean', or set causal false"
        )


class TextTransformer(nn.Module):
    """``pool``: ``eot`` (the last non-padding token, i.e. end-of-text), ``first`` (a leading
    [CLS]/BOS token; needs bidirectional attention) or ``mean`` over non-padding tokens.
    Output: (B, width) pooled features. ``length_buckets`` > 1 runs CPU batches in that many
    length buckets (same result up to float rounding); on an accelerator padding is nearly
    free and reading the lengths would cost a host sync, so it is ignored there."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        pool: str = "mean",
        pad_id: int = 0,
        length_buckets: int = 1,
    ) -> None:
        super().__init__()
        check_text_shape(vocab_size, width, heads, causal, pool, pad_id)
        self.context_length = context_length
        self.causal = causal
        self.pool = pool
        self.pad_id = pad_id
        self.length_buckets = length_buckets
        self.feature_dim = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.encoder = Encoder(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        if length > self.context_length:
            raise ValueError(
                f"token batch has length {length} but the text tower's context_length is "
                f"{self.context_length}; truncate the captions or raise context_length"
            )
        buckets = min(self.length_buckets, batch // MIN_BUCKET)
        if buckets > 1 and tokens.device.type == "cpu":
            return self._bucketed(tokens, buckets)
        return self._encode(tokens)

    def _bucketed(self, tokens: torch.Tensor, buckets: int) -> torch.Tensor:
        """``_encode`` on buckets of captions sorted by length, each trimmed to its longest.
        The buckets depend on the batch alone, so runs stay deterministic."""
        lengths = (tokens != self.pad_id).sum(dim=1)
        order = torch.sort(lengths, stable=True).indices
        sorted_lengths = lengths[order].tolist()
        parts = []
        for chunk in torch.tensor_split(torch.arange(len(order)), buckets):
            rows = order[chunk]
            parts.append(self._encode(tokens[rows, : sorted_lengths[int(chunk[-1])]]))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return torch.cat(parts)[inverse]

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        # Captions are right-padded and never empty (the tokenizer adds begin/end tokens), so
        # the non-padding tokens are a prefix; no check here to keep the step free of host syncs.
        keep = tokens != self.pad_id
        mask = keep[:, None, None, :]  # (B, 1, 1, L): no query attends to padding keys
        if self.causal:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        x = self.encoder(self.token_embed(tokens) + self.pos_embed[:, :length], mask)
        x = self.norm(x)
        if self.pool == "first":
            return x[:, 0]
        if self.pool == "eot":
            last = keep.sum(dim=1) - 1
            return x[torch.arange(batch, device=tokens.device), last]
        weights = keep.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1)
