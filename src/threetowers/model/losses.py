"""Contrastive terms (softmax InfoNCE, SigLIP sigmoid, L2 alignment) and the 3T objective.

Distributed exactness. Each rank gathers the embeddings of all ranks (with gradients) and
computes only its own rows of the B x B logits: its *share* of the global loss, scaled so
that the mean of the shares over ranks is the global loss (a rank holding B_r of the B rows
weighs its row mean by N·B_r/B, so ranks may hold different numbers of rows). The gather's
backward sums, into each rank's embeddings, the gradients of every rank's share, which is N
times the gradient of the global loss; DDP then averages parameter gradients over the N
ranks, so every parameter (temperatures included) ends up with exactly the single-process
gradient of the loss on the concatenated batch. Without DDP, average the gradients over
ranks yourself.

Blocked terms (``block_size`` > 0, ``blocked_losses``) give the same shares, values and
gradients in O(B·block) memory instead of O(B²).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from threetowers.distributed import gather_with_grad, row_counts, world_size
from threetowers.model.blocked_losses import (
    blocked_distillation_term,
    blocked_sigmoid_term,
    blocked_softmax_term,
)
from threetowers.model.objective import Term

LossKind = Literal["softmax", "sigmoid"]
Alignment = Literal["contrastive", "l2"]  # how f and g align with a frozen tower
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)


def check_term_weights(terms: Sequence[Term], weights: Mapping[str, float]) -> None:
    """The one check of term weights (the loss and the config both call it): each names a
    term, and not all are 0 (a term without a weight has weight 1)."""
    unknown = set(weights) - {t.name for t in terms}
    if unknown:
        known = ", ".join(t.name for t in terms)
        raise ValueError(f"unknown loss terms {sorted(unknown)}; this objective has {known}")
    if all(weights.get(t.name, 1.0) == 0 for t in terms):
        raise ValueError(
            f"every loss term ({', '.join(t.name for t in terms)}) has weight 0; give at "
            "least one a positive weight"
        )


def softmax_term(
    a: torch.Tensor,
    b: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
) -> torch.Tensor:
    """This rank's share of ½[CE(s·a bᵀ) + CE(s·b aᵀ)] with the positives on the diagonal.

    ``a``, ``b``: local (B, D) normalised embeddings; ``a_all``, ``b_all``: the global batch;
    ``offset``: where the local rows sit in it.
    """
    labels = torch.arange(a.shape[0], device=a.device) + offset
    a_to_b = F.cross_entropy(scale * a @ b_all.T, labels)
    b_to_a = F.cross_entropy(scale * b @ a_all.T, labels)
    return (a_to_b + b_to_a) / 2


def sigmoid_term(
    a: torch.Tensor, b_all: torch.Tensor, offset: int, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """This rank's share of −mean_ij log σ(y_ij (s aᵢ·bⱼ + β)), y = +1 on the diagonal, −1 off.

    The mean over all B² pairs (SigLIP sums over j and averages over i, i.e. B times this;
    Adam is invariant to that constant).
    """
    logits = scale * a @ b_all.T + bias
    signs = -torch.ones_like(logits)
    rows = torch.arange(a.shape[0], device=a.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).mean()


def distillation_term(
    a: torch.Tensor,
    b: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    u_all: torch.Tensor,
    v_all: torch.Tensor,
    scale: torch.Tensor,
    teacher_scale: torch.Tensor,
) -> torch.Tensor:
    """This rank's share of ½[KL(P ‖ Q) image→text + KL(P ‖ Q) text→image], each the mean
    over rows of the KL divergence between a row's in-batch distributions: the teacher's P
    (softmax of t·u vᵀ, a frozen image-text pair's embeddings u, v and its own scale t) and
    the student's Q (softmax of s·a bᵀ), as MobileCLIP distils a CLIP teacher.

    ``a``, ``b`` and ``u``, ``v``: the local rows; ``*_all``: the global batch.
    """

    def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

    image_to_text = kl(scale * a @ b_all.T, teacher_scale * u @ v_all.T)
    text_to_image = kl(scale * b @ a_all.T, teacher_scale * v @ u_all.T)
    return (image_to_text + text_to_image) / 2


def l2_term(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Feature-regression alignment: mean squared distance between paired embeddings."""
    return (a - b).pow(2).sum(dim=-1).mean()


class ThreeTowersLoss(nn.Module):
    """The weighted mean of an objective's terms, each with its own learned scale (and bias).

    ``terms`` come from :func:`~threetowers.model.objective.structure`; ``weights`` maps term
    names to weights (1 when absent); a term of weight 0 is not computed and gets no
    parameters. ``shared_temperature`` uses one scale (and one bias) for all terms. The scale
    is exp(log_scale) clamped to ``max_scale``. ``block_size`` > 0 computes the contrastive
    terms that many rows at a time (``blocked_*_term``): the same loss and gradients in
    O(B·block_size) memory instead of O(B²); 0 uses the plain terms.

    A distillation term (``Term.teacher``) compares in-batch softmax distributions whatever
    ``kind`` (a learned scale of its own on the student's side, no bias); ``teacher_scales``
    gives each one its teacher pair's own scale, fixed.
    """

    def __init__(
        self,
        terms: Sequence[Term],
        kind: str = "softmax",
        weights: dict[str, float] | None = None,
        shared_temperature: bool = False,
        init_scale: float = 10.0,
        max_scale: float = 100.0,
        init_bias: float = -10.0,
        alignment: str = "contrastive",
        block_size: int = 0,
        teacher_scales: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
        if alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {alignment!r}; choose one of {ALIGNMENTS}")
        if not isinstance(block_size, int) or block_size < 0:
            raise ValueError(
                f"block_size must be an integer >= 0 (0: unblocked), got {block_size!r}"
            )
        weights = dict(weights or {})
        check_term_weights(terms, weights)
        self.kind = kind
        self.alignment = alignment
        self.block_size = block_size
        self._softmax_term = (
            partial(blocked_softmax_term, block_size=block_size) if block_size else softmax_term
        )
        self._sigmoid_term = (
            partial(blocked_sigmoid_term, block_size=block_size) if block_size else sigmoid_term
        )
        self._distillation_term = (
            partial(blocked_distillation_term, block_size=block_size)
            if block_size
            else distillation_term
        )
        self.max_scale = max_scale
        self.terms = tuple(t for t in terms if weights.get(t.name, 1.0) > 0)
        self.weights = {t.name: float(weights.get(t.name, 1.0)) for t in self.terms}
        learned = [t.name for t in self.terms if self._is_contrastive(t)]
        names = ["shared"] if shared_temperature and learned else learned
        self.temperature_of = {n: ("shared" if shared_temperature else n) for n in learned}
        self.log_scale = nn.ParameterDict(
            {n: nn.Parameter(torch.tensor(math.log(init_scale))) for n in names}
        )
        biased = {
            self.temperature_of[t.name] for t in self.terms if t.name in learned and not t.teacher
        }
        self.bias = nn.ParameterDict(
            {n: nn.Parameter(torch.tensor(float(init_bias))) for n in names if n in biased}
            if kind == "sigmoid"
            else {}
        )
        distilled = {t.name for t in self.terms if t.teacher}
        scales = dict(teacher_scales or {})
        if distilled - scales.keys():
            raise ValueError(
                f"distillation terms {sorted(distilled - scales.keys())} need their teacher's scale"
            )
        self.teacher_scales = {name: float(scales[name]) for name in sorted(distilled)}

    def _is_contrastive(self, term: Term) -> bool:
        return not (term.alignment and self.alignment == "l2")

    def scale(self, term_name: str) -> torch.Tensor:
        # Clamped in log space, with the very bound clamp_temperatures_ uses (exp of the
        # float32 log of max_scale may round above max_scale).
        log_scale = self.log_scale[self.temperature_of[term_name]]
        return log_scale.clamp(max=math.log(self.max_scale)).exp()

    @torch.no_grad()
    def clamp_temperatures_(self) -> None:
        """Pull each learned log-scale back to log(max_scale) after an optimizer step.

        Above the clamp the scale's gradient is zero, so Adam's momentum would carry the
        parameter ever further and the scale could never come back down; at the clamp the
        gradient flows again (as CLIP's training clamps its logit scale).
        """
        for log_scale in self.log_scale.values():
            log_scale.clamp_(max=math.log(self.max_scale))

    def forward(
        self, embeddings: dict[str, torch.Tensor], counts: list[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (this rank's loss, logs). Logs hold detached per-term losses and scales.

        ``counts``: every rank's number of rows (``distributed.row_counts``; looked up when
        None under torch.distributed, unused in one process).
        """
        needed = {
            k
            for t in self.terms
            if self._is_contrastive(t)
            for k in (t.image_key, t.text_key, *(t.teacher or ()))
        }
        share = 1.0
        if world_size() > 1:
            first = next(iter(embeddings.values()))
            counts = counts or row_counts(first.shape[0], first.device)
            share = world_size() * first.shape[0] / sum(counts)
        gathered = {key: gather_with_grad(embeddings[key], counts) for key in sorted(needed)}
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for term in self.terms:
            a, b = embeddings[term.image_key], embeddings[term.text_key]
            if not self._is_contrastive(term):
                value = l2_term(a, b)
            else:
                (a_all, offset), (b_all, _) = gathered[term.image_key], gathered[term.text_key]
                scale = self.scale(term.name)
                if term.teacher:
                    (u_all, _), (v_all, _) = (gathered[key] for key in term.teacher)
                    u, v = (embeddings[key] for key in term.teacher)
                    teacher_scale = scale.new_tensor(self.teacher_scales[term.name])
                    value = self._distillation_term(
                        a, b, a_all, b_all, u, v, u_all, v_all, scale, teacher_scale
                    )
                elif self.kind == "softmax":
                    value = self._softmax_term(a, b, a_all, b_all, offset, scale)
                else:
                    bias = self.bias[self.temperature_of[term.name]]
                    value = self._sigmoid_term(a, b_all, offset, scale, bias)
                    logs[f"bias/{term.name}"] = bias.detach()
                logs[f"scale/{term.name}"] = scale.detach()
            if share != 1.0:
                value = value * share
            logs[f"loss/{term.name}"] = value.detach()
            total = total + self.weights[term.name] * value
        total = total / sum(self.weights.values())
        logs["loss"] = total.detach()
        return total, logs
