"""AdamW parameter groups and the warmup + cosine learning-rate schedule (restarted over
the steps each continuation of a run adds)."""

from __future__ import annotations

import math

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm scales and the temperatures
    (scalars) are excluded, as in CLIP and big_vision; the frozen third tower is absent."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Multiplier of the base lr: linear warmup from 1/warmup, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s trainable parameters (:func:`parameter_groups`), fused into one
    kernel where they are on CUDA, and its warmup + cosine schedule over ``total_steps``."""
    groups = parameter_groups(model, weight_decay)
    fused = True if _on_cuda(groups) else None  # None: torch's default kernel, as before
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup_steps, total_steps)
    )
    return optimizer, schedule


def _on_cuda(groups: list[dict]) -> bool:
    """Whether every parameter is on CUDA, where AdamW's fused kernel runs the update (one
    launch for all tensors). The CPU's fused AdamW (torch 2.13) differs from the default
    kernel in the last bits, which would move every CPU run's numbers. A checkpoint's
    optimizer state keeps the choice it was saved with (torch restores the groups' flags):
    a run resumes as it began."""
    return all(param.is_cuda for group in groups for param in group["params"])


def continued_schedule(warmup_steps: int, steps: int, continued_from: list[int]):
    """The lr multiplier after ``step`` steps: warmup and cosine to 0 over ``steps``,
    restarted at each step a continuation began (``train.continued_from``), over the steps
    it added."""
    starts = [0, *continued_from]
    parts = [
        (start, warmup_cosine(warmup_steps, end - start))
        for start, end in zip(starts, [*continued_from, steps], strict=True)
    ]

    def factor(step: int) -> float:
        start, part = next((start, part) for start, part in reversed(parts) if step >= start)
        return part(step - start)

    return factor


def follow(schedule: torch.optim.lr_scheduler.LambdaLR, factor) -> None:
    """Make ``schedule`` (its state restored) follow ``factor`` from its step on: a
    checkpoint holds the lr of the schedule it was saved under, which a continuation
    restarts."""
    schedule.lr_lambdas = [factor] * len(schedule.lr_lambdas)
    for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs, strict=True):
        group["lr"] = base * factor(schedule.last_epoch)
