"""Blocked contrastive terms against the plain ones: values, every gradient, saved memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import threetowers as tt
from tests.conftest import terms_of, tiny_batch, tiny_model
from threetowers.model.blocked_losses import blocked_sigmoid_term, blocked_softmax_term
from threetowers.model.losses import ThreeTowersLoss, sigmoid_term, softmax_term

# (batch, block): one block larger than the batch, ragged last blocks, exact multiples.
SIZES = [(1, 3), (7, 3), (7, 256), (64, 16), (64, 64), (100, 16), (100, 256)]
RANKS = 3
DIM = 8


def leaf(*shape, generator, dtype=torch.float64, norm=True):
    x = torch.randn(*shape, generator=generator, dtype=dtype)
    return (F.normalize(x, dim=-1) if norm else x).requires_grad_()


def scalar(value, dtype=torch.float64):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def value_and_grads(loss, inputs):
    return loss.detach(), torch.autograd.grad(loss, inputs)


def assert_same(expected, actual, rtol=1e-10, atol=1e-12):
    (expected_value, expected_grads), (value, grads) = expected, actual
    # Under autocast the plain sigmoid term comes out in bf16, the blocked one in float32.
    torch.testing.assert_close(value, expected_value.to(value.dtype), rtol=rtol, atol=atol)
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        torch.testing.assert_close(
            grad, expected_grad, rtol=rtol, atol=atol, msg=lambda m, i=i: f"input {i}: {m}"
        )


def share_inputs(batch, rank, seed=0):
    """One rank's view: local a, b (separate leaves) and the global a_all, b_all."""
    generator = torch.Generator().manual_seed(seed)
    a_all = leaf(RANKS * batch, DIM, generator=generator)
    b_all = leaf(RANKS * batch, DIM, generator=generator)
    offset = rank * batch
    rows = slice(offset, offset + batch)
    a = a_all.detach()[rows].clone().requires_grad_()
    b = b_all.detach()[rows].clone().requires_grad_()
    return a, b, a_all, b_all, offset


@pytest.mark.parametrize(("batch", "block"), SIZES)
def test_softmax_share_matches_plain_for_every_input(batch, block):
    a, b, a_all, b_all, offset = share_inputs(batch, rank=1)
    scale = scalar(7.0)
    inputs = (a, b, a_all, b_all, scale)
    expected = value_and_grads(softmax_term(a, b, a_all, b_all, offset, scale), inputs)
    actual = value_and_grads(blocked_softmax_term(a, b, a_all, b_all, offset, scale, block), inputs)
    assert_same(expected, actual)
    assert all(g.abs().sum() > 0 for g in actual[1])  # every input is really reached


@pytest.mark.parametrize(("batch", "block"), SIZES)
def test_softmax_one_process_matches_plain(batch, block):
    """a_all is a and b_all is b: the path where one block serves both directions."""
    generator = torch.Generator().manual_seed(1)
    a, b = leaf(batch, DIM, generator=generator), leaf(batch, DIM, generator=generator)
    scale = scalar(7.0)
    expected = value_and_grads(softmax_term(a, b, a, b, 0, scale), (a, b, scale))
    actual = value_and_grads(blocked_softmax_term(a, b, a, b, 0, scale, block), (a, b, scale))
    assert_same(expected, actual)


@pytest.mark.parametrize(("batch", "block"), SIZES)
def test_sigmoid_share_matches_plain_for_every_input(batch, block):
    a, _, _, b_all, offset = share_inputs(batch, rank=2)
    scale, bias = scalar(7.0), scalar(-3.0)
    inputs = (a, b_all, scale, bias)
    expected = value_and_grads(sigmoid_term(a, b_all, offset, scale, bias), inputs)
    actual = value_and_grads(blocked_sigmoid_term(a, b_all, offset, scale, bias, block), inputs)
    assert_same(expected, actual)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_shares_over_simulated_ranks_give_the_global_loss_and_gradients(kind):
    batch, block = 7, 3
    generator = torch.Generator().manual_seed(2)
    a_all = leaf(RANKS * batch, DIM, generator=generator)
    b_all = leaf(RANKS * batch, DIM, generator=generator)
    scale, bias = scalar(5.0), scalar(-2.0)

    def share(rank):
        # Slicing the global leaves plays the gather: the share's gradient flows back to them.
        offset = rank * batch
        a, b = a_all[offset : offset + batch], b_all[offset : offset + batch]
        if kind == "softmax":
            return blocked_softmax_term(a, b, a_all, b_all, offset, scale, block)
        return blocked_sigmoid_term(a, b_all, offset, scale, bias, block)

    if kind == "softmax":
        inputs = (a_all, b_all, scale)
        global_loss = softmax_term(a_all, b_all, a_all, b_all, 0, scale)
    else:
        inputs = (a_all, b_all, scale, bias)
        global_loss = sigmoid_term(a_all, b_all, 0, scale, bias)
    mean_of_shares = sum(share(r) for r in range(RANKS)) / RANKS
    assert_same(value_and_grads(global_loss, inputs), value_and_grads(mean_of_shares, inputs))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_three_towers_loss_with_block_size_matches_plain(kind):
    weights = {"f_g": 2.0, "fh_h": 0.5, "gh_h": 1.0}
    plain = ThreeTowersLoss(terms_of("3t"), kind=kind, weights=weights).double()
    blocked = ThreeTowersLoss(terms_of("3t"), kind=kind, weights=weights, block_size=5).double()
    with torch.no_grad():  # distinct scales and biases, so that a mix-up between terms shows
        for i, (p, q) in enumerate(
            zip(plain.log_scale.values(), blocked.log_scale.values(), strict=True)
        ):
            p.fill_(math.log(4.0 + 3 * i))
            q.fill_(math.log(4.0 + 3 * i))
        for i, (p, q) in enumerate(zip(plain.bias.values(), blocked.bias.values(), strict=True)):
            p.fill_(-4.0 - i)
            q.fill_(-4.0 - i)
    generator = torch.Generator().manual_seed(3)
    keys = ("z_f", "z_g", "z_fh", "z_gh", "z_h")
    embeddings = {k: leaf(23, DIM, generator=generator) for k in keys}

    def run(loss_fn):
        total, logs = loss_fn(embeddings)
        params = [*loss_fn.log_scale.values(), *loss_fn.bias.values()]
        return value_and_grads(total, [*embeddings.values(), *params]), logs

    expected, expected_logs = run(plain)
    actual, logs = run(blocked)
    assert_same(expected, actual)
    for name in ("f_g", "fh_h", "gh_h"):
        torch.testing.assert_close(logs[f"loss/{name}"], expected_logs[f"loss/{name}"])


def test_float32_large_logits_stay_finite_and_match():
    """Logits of ±1e4 overflow exp without a max shift; both directions must shift."""
    generator = torch.Generator().manual_seed(4)
    a = leaf(50, DIM, generator=generator, dtype=torch.float32, norm=False)
    b = leaf(50, DIM, generator=generator, dtype=torch.float32, norm=False)
    with torch.no_grad():
        a.mul_(10.0)
        b.mul_(10.0)
    scale = scalar(100.0, torch.float32)
    expected = value_and_grads(softmax_term(a, b, a, b, 0, scale), (a, b, scale))
    actual = value_and_grads(blocked_softmax_term(a, b, a, b, 0, scale, 16), (a, b, scale))
    assert torch.isfinite(actual[0]) and actual[0] > 1e3
    assert_same(expected, actual, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bf16_autocast_matches_plain_and_keeps_gradient_dtypes(kind):
    generator = torch.Generator().manual_seed(5)
    a = leaf(40, 32, generator=generator, dtype=torch.float32)
    b = leaf(40, 32, generator=generator, dtype=torch.float32)
    scale, bias = scalar(10.0, torch.float32), scalar(-5.0, torch.float32)
    if kind == "softmax":
        inputs = (a, b, scale)
        plain = lambda: softmax_term(a, b, a, b, 0, scale)  # noqa: E731
        blocked = lambda: blocked_softmax_term(a, b, a, b, 0, scale, 16)  # noqa: E731
    else:
        inputs = (a, b, scale, bias)
        plain = lambda: sigmoid_term(a, b, 0, scale, bias)  # noqa: E731
        blocked = lambda: blocked_sigmoid_term(a, b, 0, scale, bias, 16)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, actual_loss = plain(), blocked()
    assert actual_loss.dtype == torch.float32
    expected = value_and_grads(expected_loss, inputs)
    actual = value_and_grads(actual_loss, inputs)
    assert all(g.dtype == torch.float32 for g in actual[1])
    # bf16 keeps ~3 significant digits of the logits; both round the same matmul.
    assert_same(expected, actual, rtol=2e-2, atol=2e-3)


def saved_sizes(fn) -> list[int]:
    """Element counts of every tensor that autograd saves for the backward while fn runs."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn().backward()
    return sizes


@pytest.mark.parametrize("form", ["softmax one process", "softmax share", "sigmoid"])
def test_blocked_terms_save_no_batch_by_batch_tensor(form):
    batch, block = 512, 64
    generator = torch.Generator().manual_seed(6)
    a, b = (leaf(batch, DIM, generator=generator, dtype=torch.float32) for _ in range(2))
    a_all, b_all = (leaf(2 * batch, DIM, generator=generator, dtype=torch.float32) for _ in "ab")
    scale, bias = scalar(10.0, torch.float32), scalar(-5.0, torch.float32)
    if form == "softmax one process":
        terms = (softmax_term, blocked_softmax_term), (a, b, a, b, 0, scale)
    elif form == "softmax share":
        terms = (softmax_term, blocked_softmax_term), (a, b, a_all, b_all, batch, scale)
    else:
        terms = (sigmoid_term, blocked_sigmoid_term), (a, b_all, batch, scale, bias)
    (plain, blocked), args = terms
    # The hook sees the plain term's logits, so it would see a blocked one's too.
    assert max(saved_sizes(lambda: plain(*args))) >= batch * batch
    assert max(saved_sizes(lambda: blocked(*args, block))) < batch * batch


def test_block_size_is_validated_and_reaches_the_loss():
    a = torch.randn(4, DIM)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="block_size must be a positive integer"):
            blocked_softmax_term(a, a, a, a, 0, torch.tensor(1.0), bad)
    with pytest.raises(ValueError, match=r"block_size must be an integer >= 0 \(0: unblocked\)"):
        ThreeTowersLoss(terms_of("3t"), block_size=-1)
    with pytest.raises(tt.ConfigError, match="loss.block_size: Input should be greater than or"):
        tt.load_config("tiny", ["loss.block_size=-1"])
    model = tiny_model("3t", "loss.block_size=3")
    assert model.loss_fn.block_size == 3
    images, tokens = tiny_batch()
    total, _ = model.loss(model(images, tokens))
    reference = tiny_model("3t")
    expected, _ = reference.loss(reference(images, tokens))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
