"""The distillation term (a frozen image-text pair's in-batch similarities taught to f and g)
against a float64 reference written out from the definition: value and gradients, plain and
blocked, as one rank's share and summed over simulated ranks; no gradient reaches the
teacher."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_blocked_losses import SIZES, assert_same, leaf, scalar, value_and_grads
from threetowers.model.blocked_losses import blocked_distillation_term
from threetowers.model.losses import distillation_term

RANKS, DIM, TEACHER_DIM = 3, 8, 6


def reference(a, b, u, v, scale, teacher_scale):
    """½ mean over rows of Σⱼ Pᵢⱼ log(Pᵢⱼ / Qᵢⱼ), both directions, each probability an
    exponential over its row's sum: the definition, nothing fused."""

    def kl(student, teacher):
        p = teacher.exp() / teacher.exp().sum(1, keepdim=True)
        q = student.exp() / student.exp().sum(1, keepdim=True)
        return (p * (p.log() - q.log())).sum(1).mean()

    similarity, teacher = scale * a @ b.T, teacher_scale * u @ v.T
    return (kl(similarity, teacher) + kl(similarity.T, teacher.T)) / 2


def batch(rows: int, seed: int = 0):
    """Student embeddings a, b (leaves) and a teacher's u, v of another width (no gradient)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = leaf(rows, DIM, generator=generator), leaf(rows, DIM, generator=generator)
    u = leaf(rows, TEACHER_DIM, generator=generator).detach()
    v = leaf(rows, TEACHER_DIM, generator=generator).detach()
    return a, b, u, v


TERMS = {
    "plain": distillation_term,
    **{
        f"blocked {block}": (lambda *x, block=block: blocked_distillation_term(*x, block))
        for block in (1, 3, 64)
    },
}


@pytest.mark.parametrize("term", TERMS)
def test_the_term_is_the_mean_of_both_directions_kl_divergences(term):
    a, b, u, v = batch(7)
    scale, teacher_scale = scalar(6.0), torch.tensor(30.0, dtype=torch.float64)
    inputs = (a, b, scale)
    expected = value_and_grads(reference(a, b, u, v, scale, teacher_scale), inputs)
    got = value_and_grads(TERMS[term](a, b, a, b, u, v, u, v, scale, teacher_scale), inputs)
    assert_same(expected, got)
    assert got[0] > 0.1 and all(grad.abs().sum() > 0 for grad in got[1])


@pytest.mark.parametrize(("rows", "block"), SIZES)
def test_blocked_shares_equal_the_plain_shares(rows, block):
    """One rank's rows against the global batch, every student input's gradient."""
    a_all, b_all, u_all, v_all = batch(RANKS * rows, seed=1)
    local = slice(rows, 2 * rows)  # rank 1's
    a, b = (x.detach()[local].clone().requires_grad_() for x in (a_all, b_all))
    u, v = u_all[local], v_all[local]
    scale, teacher_scale = scalar(7.0), torch.tensor(20.0, dtype=torch.float64)
    inputs = (a, b, a_all, b_all, scale)
    common = (a, b, a_all, b_all, u, v, u_all, v_all, scale, teacher_scale)
    expected = value_and_grads(distillation_term(*common), inputs)
    assert_same(expected, value_and_grads(blocked_distillation_term(*common, block), inputs))


@pytest.mark.parametrize("term", TERMS)
def test_the_mean_of_the_ranks_shares_is_the_global_term(term):
    rows = 5
    a_all, b_all, u_all, v_all = batch(RANKS * rows, seed=2)
    scale, teacher_scale = scalar(5.0), torch.tensor(50.0, dtype=torch.float64)

    def share(rank: int) -> torch.Tensor:
        local = slice(rank * rows, (rank + 1) * rows)  # slicing the leaves plays the gather
        parts = (a_all[local], b_all[local], a_all, b_all, u_all[local], v_all[local])
        return TERMS[term](*parts, u_all, v_all, scale, teacher_scale)

    inputs = (a_all, b_all, scale)
    expected = value_and_grads(reference(a_all, b_all, u_all, v_all, scale, teacher_scale), inputs)
    mean_of_shares = sum(share(rank) for rank in range(RANKS)) / RANKS
    assert_same(expected, value_and_grads(mean_of_shares, inputs))


@pytest.mark.parametrize("term", TERMS)
def test_a_student_that_is_its_teacher_has_nothing_to_learn(term):
    a, b, _, _ = batch(6, seed=3)
    scale = scalar(9.0)
    same = TERMS[term](
        a, b, a, b, a.detach(), b.detach(), a.detach(), b.detach(), scale, scale.detach()
    )
    assert abs(same.item()) < 1e-12
    assert all(grad.abs().max() < 1e-12 for grad in torch.autograd.grad(same, (a, b, scale)))


def test_the_blocked_gradients_pass_gradcheck():
    a, b, u, v = batch(5, seed=4)
    teacher_scale = torch.tensor(10.0, dtype=torch.float64)

    def term(a, b, scale):
        return blocked_distillation_term(a, b, a, b, u, v, u, v, scale, teacher_scale, 2)

    assert torch.autograd.gradcheck(term, (a, b, scalar(4.0)))
