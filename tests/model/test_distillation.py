"""The distillation term (a frozen image-text pair's in-batch similarities taught to f and g)
against a float64 reference written out from the definition: value and gradients, plain and
blocked, as one rank's share, summed over simulated ranks, and in the loss on 2 gloo ranks
with unequal shares; no gradient reaches the teacher."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.model.test_blocked_losses import SIZES, assert_same, leaf, scalar, value_and_grads
from threetowers.model.blocked_losses import blocked_distillation_term
from threetowers.model.losses import ThreeTowersLoss, distillation_term
from threetowers.model.objective import Term

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


def distilling_loss(kind: str = "softmax", block: int = 0) -> ThreeTowersLoss:
    """f_g and a distillation term teaching z_f, z_g a pair p's embeddings (p_image, p_text)."""
    terms = [
        Term("f_g", "z_f", "z_g", False),
        Term("p_distill", "z_f", "z_g", False, teacher=("z_p_image", "z_p_text")),
    ]
    loss = ThreeTowersLoss(
        terms, kind, {"p_distill": 0.5}, block_size=block, teacher_scales={"p_distill": 25.0}
    )
    return loss.double()


def embeddings(rows: int, seed: int = 5) -> dict[str, torch.Tensor]:
    a, b, u, v = batch(rows, seed)
    return {"z_f": a, "z_g": b, "z_p_image": u, "z_p_text": v}


@pytest.mark.parametrize(
    ("kind", "block"), [("softmax", 0), ("softmax", 3), ("sigmoid", 0), ("sigmoid", 3)]
)
def test_the_loss_weighs_the_distillation_term_in(kind, block):
    """(f_g + ½ distillation) / 1.5, the distillation term on its own learned scale and the
    teacher's, softmax whatever the loss's kind; no bias for it."""
    loss = distilling_loss(kind, block)
    out = embeddings(8)
    total, logs = loss(out)
    scale = loss.scale("p_distill")
    teacher = torch.tensor(25.0, dtype=torch.float64)
    distilled = reference(out["z_f"], out["z_g"], out["z_p_image"], out["z_p_text"], scale, teacher)
    torch.testing.assert_close(logs["loss/p_distill"], distilled.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        total, (logs["loss/f_g"] + 0.5 * distilled) / 1.5, rtol=1e-10, atol=1e-12
    )
    assert sorted(loss.log_scale) == ["f_g", "p_distill"]
    assert sorted(loss.bias) == (["f_g"] if kind == "sigmoid" else [])


def test_a_distillation_term_needs_its_teachers_scale():
    terms = [Term("p_distill", "z_f", "z_g", False, teacher=("z_p_image", "z_p_text"))]
    with pytest.raises(ValueError, match=r"distillation terms \['p_distill'\] need"):
        ThreeTowersLoss(terms)


SHARES = [3, 5]  # the ranks' rows: unequal, as bad samples make them


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for block in (0, 3):
            loss = distilling_loss(block=block)
            whole = embeddings(sum(SHARES))
            rows = slice(sum(SHARES[:rank]), sum(SHARES[: rank + 1]))
            local = {
                key: value.detach()[rows].clone().requires_grad_() for key, value in whole.items()
            }
            total, _ = loss(local, SHARES)
            total.backward()
            grads = {key: local[key].grad for key in ("z_f", "z_g")}
            results[block] = (
                total.detach(),
                grads,
                {n: p.grad for n, p in loss.named_parameters()},
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(run_rank, args=(str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("block", [0, 3])
def test_two_ranks_give_the_loss_and_gradients_of_one_process(two_ranks, block):
    """The mean of the ranks' shares is the loss of the concatenated batch; each rank's rows
    get twice their gradient (every rank's share reaches them through the gather, which DDP's
    averaging halves), and the scales' gradients average to one process's."""
    loss = distilling_loss(block=block)
    whole = embeddings(sum(SHARES))
    total, _ = loss(whole)
    total.backward()
    got = [ranks[block] for ranks in two_ranks]
    torch.testing.assert_close(
        sum(share for share, _, _ in got) / 2, total.detach(), rtol=1e-10, atol=1e-12
    )
    for rank, (_, grads, _) in enumerate(got):
        rows = slice(sum(SHARES[:rank]), sum(SHARES[: rank + 1]))
        for key in ("z_f", "z_g"):
            torch.testing.assert_close(grads[key] / 2, whole[key].grad[rows], rtol=1e-9, atol=1e-12)
    for name, parameter in loss.named_parameters():
        mean = sum(scales[name] for _, _, scales in got) / 2
        torch.testing.assert_close(mean, parameter.grad, rtol=1e-9, atol=1e-12, msg=name)
