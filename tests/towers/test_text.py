"""The text tower g: padding must not change a caption's embedding."""

from __future__ import annotations

import pytest
import torch

from threetowers.towers.text import TextTransformer

CAPTIONS = [[5, 9, 13, 2], [7, 3], [11, 12, 4, 8, 6, 2]]


def padded(captions, length):
    return torch.tensor([c + [0] * (length - len(c)) for c in captions])


@pytest.mark.parametrize(
    ("causal", "pool"),
    [(False, "mean"), (False, "eot"), (False, "first"), (True, "eot"), (True, "mean")],
)
def test_padding_does_not_change_the_embedding(causal, pool):
    torch.manual_seed(0)
    tower = TextTransformer(32, 16, 32, 2, 4, causal=causal, pool=pool).eval()
    short, long = tower(padded(CAPTIONS, 6)), tower(padded(CAPTIONS, 16))
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    one_by_one = torch.cat([tower(torch.tensor([c])) for c in CAPTIONS])
    torch.testing.assert_close(one_by_one, long, rtol=1e-5, atol=1e-6)


def test_pools_pick_the_right_tokens():
    torch.manual_seed(0)
    tokens = padded(CAPTIONS, 8)
    eot = TextTransformer(32, 8, 32, 1, 4, causal=True, pool="eot").eval()
    # With causal attention the eot feature of a caption equals that of its own prefix run.
    torch.testing.assert_close(
        eot(tokens)[0], eot(torch.tensor([CAPTIONS[0]]))[0], rtol=1e-5, atol=1e-6
    )
    prefix = eot(torch.tensor([CAPTIONS[0][:2]]))[0]
    assert not torch.allclose(eot(tokens)[0], prefix)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_attention_ignores_later_tokens(causal):
    torch.manual_seed(0)
    tower = TextTransformer(32, 8, 32, 2, 4, causal=causal, pool="mean").eval()
    states = []
    tower.norm.register_forward_hook(lambda module, inputs, output: states.append(output))
    tower(torch.tensor([[5, 9, 13, 2]]))
    tower(torch.tensor([[5, 9, 17, 2]]))  # differs only at position 2
    first, second = states
    assert torch.allclose(first[:, :2], second[:, :2], atol=1e-6) == causal
    assert not torch.allclose(first[:, 2:], second[:, 2:])


def test_bad_configuration_and_overlong_input_are_named():
    with pytest.raises(ValueError, match="pool 'first' with causal attention"):
        TextTransformer(32, 8, 32, 1, 4, causal=True, pool="first")
    tower = TextTransformer(32, 4, 32, 1, 4)
    with pytest.raises(ValueError, match="context_length is 4"):
        tower(torch.ones(1, 6, dtype=torch.long))
