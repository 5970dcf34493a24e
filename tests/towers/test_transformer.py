"""The shared attention block against a direct float64 formula."""

from __future__ import annotations

import torch

from threetowers.towers.transformer import SelfAttention


def reference_attention(
    layer: SelfAttention, x: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    batch, length, width = x.shape
    heads, head_dim = layer.heads, width // layer.heads
    q, k, v = (x @ layer.qkv.weight.T + layer.qkv.bias).split(width, dim=-1)
    out = torch.empty_like(x)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / head_dim**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[..., cols] = torch.softmax(scores, dim=-1) @ v[..., cols]
    return out @ layer.out.weight.T + layer.out.bias


def test_masked_attention_matches_direct_formula():
    torch.manual_seed(0)
    layer = SelfAttention(width=12, heads=3).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    allowed = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    allowed[1, :, 3:] = False  # padding keys of the second sequence
    allowed[1, 3:, :3] = True
    got = layer(x, allowed[:, None])
    torch.testing.assert_close(got, reference_attention(layer, x, allowed))


def test_checkpointed_blocks_give_the_same_gradients_and_keep_fewer_activations():
    """Activation checkpointing recomputes each block in the backward pass: the same
    gradients (float64, bit for bit: the same operations), far fewer tensors saved."""
    from threetowers.towers.transformer import Encoder, checkpoint_blocks

    torch.manual_seed(0)
    encoder = Encoder(width=16, depth=3, heads=2, mlp_ratio=2.0).double()
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    mask = torch.ones(4, 1, 7, 7, dtype=torch.bool).tril()

    def gradients_and_saved() -> tuple[dict, int]:
        encoder.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = encoder(x, mask)
        out.square().sum().backward()
        return {n: p.grad.clone() for n, p in encoder.named_parameters()}, len(saved)

    plain, plain_saved = gradients_and_saved()
    checkpoint_blocks(encoder)
    checkpointed, checkpointed_saved = gradients_and_saved()
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[name], checkpointed[name]) for name in plain)
    assert checkpointed_saved < plain_saved / 3
