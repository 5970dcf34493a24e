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


@pytest.mark.parametrize(("causal", "pool"), [(False, "mean"), (True, "eot")])
def test_length_buckets_give_the_same_embeddings_and_gradients(causal, pool):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    captions = [
        torch.randint(1, 32, (int(n),), generator=generator).tolist()
        for n in torch.randint(2, 17, (101,), generator=generator)
    ]
    tokens = padded(captions, 16)
    # float64, so that only a real difference (not summation order) can fail the comparison
    tower = TextTransformer(32, 16, 32, 2, 4, causal=causal, pool=pool).double()
    target = torch.randn(len(captions), 32, generator=generator, dtype=torch.float64)

    encode, shapes = tower._encode, []
    tower._encode = lambda t: shapes.append(tuple(t.shape)) or encode(t)

    def run(buckets):
        tower.zero_grad()
        tower.length_buckets = buckets
        out = tower(tokens)
        (out * target).sum().backward()
        return out.detach(), [p.grad.clone() for p in tower.parameters()]

    (plain, plain_grads), (bucketed, bucketed_grads) = run(1), run(3)
    torch.testing.assert_close(bucketed, plain, rtol=1e-10, atol=1e-12)
    for got, expected in zip(bucketed_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # one full call, then three buckets of 34, 34, 33 captions trimmed to their longest
    assert [rows for rows, _ in shapes] == [101, 34, 34, 33]
    assert shapes[0][1] == 16 and shapes[1][1] < shapes[2][1] < shapes[3][1] == 16
