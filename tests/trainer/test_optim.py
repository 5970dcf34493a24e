"""trainer/optim.py: the warmup + cosine schedule against its formula, as the optimizer
sees it; the schedule restarted by each continuation; the parameter groups (weight decay on
matrices only, frozen towers absent) and AdamW's decay applied to them alone; the fused
kernel on CUDA only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import threetowers as tt
from threetowers.trainer.optim import (
    continued_schedule,
    follow,
    make_optimizer,
    parameter_groups,
    warmup_cosine,
)


def lr_formula(step: int, warmup: int, total: int) -> float:
    """The multiplier at ``step``: (step + 1) / warmup during warmup, then half a cosine
    period from 1 down to 0 over the remaining steps, 0 after them."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return (1 + math.cos(math.pi * t)) / 2


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.conv = nn.Conv2d(3, 2, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("warmup,total", [(3, 12), (0, 5), (4, 5), (1, 2)])
def test_the_optimizers_lr_follows_warmup_then_cosine_to_zero(warmup, total):
    lr = 0.3
    optimizer, schedule = make_optimizer(Small(), lr, 0.1, warmup, total)
    seen = []
    for _ in range(total + 3):  # past the end: stays at 0
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([lr * lr_formula(step, warmup, total)] * 2, abs=1e-15), step
    assert seen[total][0] == pytest.approx(0.0, abs=1e-15)
    if warmup:
        assert seen[warmup - 1][0] == pytest.approx(lr)  # the peak, at the end of warmup
        assert seen[0][0] == pytest.approx(lr / warmup)


def test_a_run_shorter_than_its_warmup_warms_up_over_every_step():
    factor = warmup_cosine(10, 4)
    assert [factor(s) for s in range(4)] == [0.1, 0.2, 0.3, 0.4]


def test_the_cosine_is_symmetric_about_its_midpoint():
    factor = warmup_cosine(2, 102)
    for k in range(0, 51):
        assert factor(2 + k) + factor(102 - k) == pytest.approx(1.0)
    assert factor(52) == pytest.approx(0.5)


def test_continued_schedule_restarts_warmup_and_cosine_over_each_added_span():
    factor = continued_schedule(2, 15, [6, 10])
    spans = [(0, 6), (6, 10), (10, 15)]
    for start, end in spans:
        for step in range(start, end):
            assert factor(step) == pytest.approx(lr_formula(step - start, 2, end - start)), step
    assert factor(15) == pytest.approx(0.0, abs=1e-15)
    assert [factor(s) for s in (6, 10)] == [0.5, 0.5]  # each continuation begins its warmup


def test_a_run_never_continued_has_the_plain_schedule():
    plain, continued = warmup_cosine(3, 20), continued_schedule(3, 20, [])
    assert [continued(s) for s in range(25)] == [plain(s) for s in range(25)]


def test_follow_moves_a_restored_schedule_onto_the_continuation():
    lr = 0.1
    model = Small()
    optimizer, schedule = make_optimizer(model, lr, 0.0, 2, 6)
    for _ in range(6):  # the first run: to its end, lr 0
        optimizer.step()
        schedule.step()
    states = optimizer.state_dict(), schedule.state_dict()
    optimizer, schedule = make_optimizer(model, lr, 0.0, 2, 6)
    optimizer.load_state_dict(states[0])  # what resuming from the checkpoint restores
    schedule.load_state_dict(states[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    factor = continued_schedule(2, 10, [6])
    follow(schedule, factor)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [lr * lr_formula(s, 2, 4) for s in range(4)]
    assert seen == pytest.approx(expected, abs=1e-15)


def test_only_trainable_matrices_are_decayed():
    model = Small()
    decay, no_decay = parameter_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == ids([model.linear.weight, model.conv.weight])
    assert ids(no_decay["params"]) == ids(
        [model.linear.bias, model.norm.weight, model.norm.bias, model.conv.bias, model.scale]
    )


def test_adamw_decays_the_matrices_alone_and_never_touches_a_frozen_tower(backbone):
    """With zero gradients AdamW's step is its decay alone: p <- p (1 - lr wd) for the
    decayed group, nothing for the others."""
    torch.manual_seed(0)
    cfg = tt.load_config("tiny", ["model.mode=3t", "model.embed_dim=16"])
    model = tt.build_model(cfg, frozen=backbone)
    lr, wd = 0.01, 0.5
    optimizer, _ = make_optimizer(model, lr, wd, 0, 10)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not {id(p) for p in frozen} & {id(p) for p in grouped}
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in grouped:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim >= 2:
            expected = before[name] * (1 - lr * wd)
        else:  # biases, norms, the learned temperature and bias, the frozen tower
            expected = before[name]
        assert torch.equal(p.detach(), expected), name


def test_the_cpu_keeps_torchs_default_adamw_kernel():
    """The CPU's fused AdamW is not bit-identical to the default kernel: CPU runs keep it."""
    optimizer, _ = make_optimizer(Small(), 1e-3, 0.1, 1, 10)
    assert [group["fused"] for group in optimizer.param_groups] == [None, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_parameters_get_the_fused_adamw():
    optimizer, _ = make_optimizer(Small().cuda(), 1e-3, 0.1, 1, 10)
    assert [group["fused"] for group in optimizer.param_groups] == [True, True]


def test_a_resumed_optimizer_keeps_the_kernel_its_checkpoint_was_saved_with():
    """A GPU run's state (fused) resumed where it is not the default, and the reverse."""
    model = Small()
    saved, _ = make_optimizer(model, 1e-3, 0.1, 1, 10)
    for group in saved.param_groups:  # as a CUDA run's optimizer holds it
        group["fused"] = True
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    saved.step()
    resumed, _ = make_optimizer(model, 1e-3, 0.1, 1, 10)
    resumed.load_state_dict(saved.state_dict())
    assert [group["fused"] for group in resumed.param_groups] == [True, True]
