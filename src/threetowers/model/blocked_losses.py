"""Blocked contrastive terms: ``losses``' softmax, sigmoid and distillation terms, the same
shares, values and gradients, holding at most a (block x global batch) slice of the logits
at a time, so memory is O(B·block) instead of O(B²). Their autograd Functions save only the
inputs and per-row statistics; the backward recomputes each block's logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable


def blocked_softmax_term(
    a: torch.Tensor,
    b: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """``softmax_term`` computed ``block_size`` rows at a time: same value and gradients."""
    _check_block_size(block_size)
    n, acc = a.shape[0], _accumulation_dtype(a.dtype)
    # The positives are O(B·D); only the log-sum-exps need the blocked Function.
    pos_ab = scale * (a * b_all[offset : offset + n]).sum(dim=-1, dtype=acc)
    pos_ba = scale * (b * a_all[offset : offset + n]).sum(dim=-1, dtype=acc)
    mm = _matmul_dtype(a)
    if a_all is a and b_all is b:
        # One process: the b→a logits are the a→b ones transposed, so each block of rows
        # also yields its part of every column's log-sum-exp (half the matmuls).
        lse_ab, lse_ba = _BlockedLogSumExp.apply(a.to(mm), b.to(mm), scale, block_size, True)
    else:
        lse_ab = _BlockedLogSumExp.apply(a.to(mm), b_all.to(mm), scale, block_size, False)
        lse_ba = _BlockedLogSumExp.apply(b.to(mm), a_all.to(mm), scale, block_size, False)
    return ((lse_ab - pos_ab).mean() + (lse_ba - pos_ba).mean()) / 2


def blocked_sigmoid_term(
    a: torch.Tensor,
    b_all: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """``sigmoid_term`` computed ``block_size`` rows at a time: same value and gradients."""
    _check_block_size(block_size)
    mm = _matmul_dtype(a)
    total = _BlockedSigmoidLoss.apply(a.to(mm), b_all.to(mm), offset, scale, bias, block_size)
    return total / (a.shape[0] * b_all.shape[0])


def blocked_distillation_term(
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
    block_size: int,
) -> torch.Tensor:
    """``distillation_term`` computed ``block_size`` rows at a time: same value and
    gradients (none reach the teacher)."""
    _check_block_size(block_size)
    mm = _matmul_dtype(a)

    def kl(x, y, teacher_x, teacher_y) -> torch.Tensor:
        teacher = (teacher_x.to(mm), teacher_y.to(mm), teacher_scale)
        return _BlockedKL.apply(x.to(mm), y.to(mm), scale, *teacher, block_size) / x.shape[0]

    return (kl(a, b_all, u, v_all) + kl(b, a_all, v, u_all)) / 2


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of ``x`` in (x's own dtype without autocast).

    The blocked Functions turn autocast off inside and take their inputs already cast, so
    that the forward and the backward's recomputation see exactly the same logits.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:  # autocast skips float64
        return torch.get_autocast_dtype(device)
    return x.dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Exponentials and sums run in at least float32, as autocast runs softmax."""
    return torch.promote_types(dtype, torch.float32)


def _autocast_off(x: torch.Tensor) -> torch.autocast:
    # The backward runs under the caller's autocast too when the engine uses its thread (CPU).
    return torch.autocast(x.device.type, enabled=False)


class _Block(NamedTuple):
    """One block of rows: which rows, s·x[rows], its logits s·x[rows] yᵀ and a scratch
    buffer of the same shape. ``logits`` and ``scratch`` are overwritten by the next block."""

    rows: slice
    xs: torch.Tensor
    logits: torch.Tensor
    scratch: torch.Tensor


def _blocks(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype
) -> Iterator[_Block]:
    """The blocks of ``block`` rows of x, with their logits against all of y in ``dtype``.

    Every block reuses two preallocated buffers: a fresh (block x B) tensor per block costs
    page faults that take longer than the arithmetic on it (4x on CPU).
    """
    shape = (min(block, x.shape[0]), y.shape[0])
    logits_buffer = x.new_empty(shape, dtype=dtype)
    scratch_buffer = x.new_empty(shape, dtype=dtype)
    for start in range(0, x.shape[0], block):
        rows = slice(start, start + block)
        xs = x[rows] * scale
        logits, scratch = logits_buffer[: xs.shape[0]], scratch_buffer[: xs.shape[0]]
        if xs.dtype == dtype:
            torch.mm(xs, y.T, out=logits)
        else:  # a low-precision matmul (autocast); exponentials run in float32
            logits.copy_(xs @ y.T)
        yield _Block(rows, xs, logits, scratch)


def _logsumexp(t: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    """Stable log-sum-exp of t along dim, with ``out`` (which may be t) as scratch."""
    peak = t.amax(dim, keepdim=True)
    return torch.sub(t, peak, out=out).exp_().sum(dim).log_().add_(peak.squeeze(dim))


def _softplus_sum(t: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Σ softplus(t) = Σ max(t, 0) + log1p(exp(−|t|)), stably; overwrites t and scratch."""
    return torch.clamp(t, min=0, out=scratch).sum() + t.abs_().neg_().exp_().log1p_().sum()


class _InputGrads:
    """Gradients of x, y and s from the gradient G of the logits s·x yᵀ, one block at a time.

    Only the requested ones are computed (``needs``: x, y, s); y's is accumulated in at least
    float32 across blocks.
    """

    def __init__(self, x, y, scale, needs: tuple[bool, bool, bool]) -> None:
        self.x, self.y, self.scale = x, y, scale
        self.needs_x, self.needs_y, self.needs_scale = needs
        acc = _accumulation_dtype(x.dtype)
        self.dx = torch.empty_like(x) if self.needs_x else None
        self.dy = y.new_zeros(y.shape, dtype=acc) if self.needs_y else None
        self.dscale = x.new_zeros((), dtype=acc)

    def add(self, block: _Block, grad_logits: torch.Tensor) -> None:
        g = grad_logits.to(self.x.dtype)
        if self.needs_x or self.needs_scale:
            gy = g @ self.y
            if self.needs_x:
                self.dx[block.rows] = gy * self.scale
            # ∂/∂s of Σ G_ij s xᵢ·yⱼ, without a (block x B) product: Σᵢ xᵢ·(G y)ᵢ.
            self.dscale += (self.x[block.rows] * gy).sum(dtype=self.dscale.dtype)
        if self.needs_y:
            if self.dy.dtype == g.dtype:
                self.dy.addmm_(g.T, block.xs)
            else:  # low-precision matmul, float32 sum over blocks
                self.dy += g.T @ block.xs

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        dy = self.dy.to(self.y.dtype) if self.needs_y else None
        return self.dx, dy, self.dscale.to(self.scale.dtype)


class _BlockedLogSumExp(torch.autograd.Function):
    """Row log-sum-exps of s·x yᵀ (with ``columns``, its column ones too), by blocks of rows.

    A block spans all columns, so its row log-sum-exps are final; column ones are merged
    across blocks with logaddexp, which stays stable without a first pass for the maxima.
    Saves x, y, s and the log-sum-exps; the backward recomputes each block's logits.
    """

    @staticmethod
    def forward(ctx, x, y, scale, block: int, columns: bool):
        acc = _accumulation_dtype(x.dtype)
        row_lse = x.new_empty(x.shape[0], dtype=acc)
        col_lse = y.new_full((y.shape[0],), -math.inf, dtype=acc) if columns else None
        with _autocast_off(x):
            for blk in _blocks(x, y, scale, block, acc):
                row_lse[blk.rows] = _logsumexp(blk.logits, 1, out=blk.scratch)
                if columns:
                    col_lse = torch.logaddexp(col_lse, _logsumexp(blk.logits, 0, out=blk.logits))
        ctx.block = block
        ctx.save_for_backward(x, y, scale, row_lse, col_lse)
        return (row_lse, col_lse) if columns else row_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, grad_cols=None):
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        grads = _InputGrads(x, y, scale, ctx.needs_input_grad[:3])
        with _autocast_off(x):
            for blk in _blocks(x, y, scale, ctx.block, row_lse.dtype):
                # ∂ lse / ∂ logits is the softmax along the row (along the column for columns).
                g = torch.sub(blk.logits, row_lse[blk.rows, None], out=blk.scratch).exp_()
                g.mul_(grad_rows[blk.rows, None])
                if col_lse is not None:
                    g.addcmul_(blk.logits.sub_(col_lse).exp_(), grad_cols)
                grads.add(blk, g)
        return *grads.result(), None, None


class _BlockedSigmoidLoss(torch.autograd.Function):
    """Σᵢⱼ −log σ(yᵢⱼ (s xᵢ·yⱼ + β)), y = +1 at j = offset + i and −1 elsewhere, by blocks.

    Saves x, y, s and β; the backward recomputes each block's logits.
    """

    @staticmethod
    def forward(ctx, x, y, offset: int, scale, bias, block: int):
        acc = _accumulation_dtype(x.dtype)
        total = x.new_zeros((), dtype=acc)
        with _autocast_off(x):
            for blk in _blocks(x, y, scale, block, acc):
                # −log σ(z) = softplus(−z), z = y·(logit + β)
                negated = _signed(blk.logits.add_(bias), offset + blk.rows.start).neg_()
                total += _softplus_sum(negated, blk.scratch)
        ctx.offset, ctx.block = offset, block
        ctx.save_for_backward(x, y, scale, bias)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        x, y, scale, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _InputGrads(x, y, scale, (needs[0], needs[1], needs[3]))
        dbias = grad_total.new_zeros(())
        with _autocast_off(x):
            for blk in _blocks(x, y, scale, ctx.block, dbias.dtype):
                diagonal = ctx.offset + blk.rows.start
                # ∂/∂logit of −log σ(y·logit) is −y σ(−y·logit).
                g = _signed(blk.logits.add_(bias), diagonal).neg_().sigmoid_()
                g.diagonal(diagonal).neg_()
                g.mul_(grad_total)
                dbias += g.sum()
                grads.add(blk, g)
        dx, dy, dscale = grads.result()
        return dx, dy, None, dscale, dbias.to(bias.dtype), None


class _BlockedKL(torch.autograd.Function):
    """Σᵢ KL(Pᵢ ‖ Qᵢ), Q the row softmax of s·x yᵀ and P that of the teacher's t·x' y'ᵀ, by
    blocks of rows. Saves the inputs; the backward recomputes each block's logits, both the
    student's and the teacher's (∂ KL(Pᵢ ‖ Qᵢ) / ∂ logitᵢⱼ = Qᵢⱼ − Pᵢⱼ)."""

    @staticmethod
    def forward(ctx, x, y, scale, teacher_x, teacher_y, teacher_scale, block: int):
        acc = _accumulation_dtype(x.dtype)
        total = x.new_zeros((), dtype=acc)
        with _autocast_off(x):
            pairs = zip(
                _blocks(x, y, scale, block, acc),
                _blocks(teacher_x, teacher_y, teacher_scale, block, acc),
                strict=True,
            )
            for student, teacher in pairs:
                log_q = student.logits.log_softmax(1)
                log_p = teacher.logits.log_softmax(1)
                total += (log_p.exp() * (log_p - log_q)).sum()
        ctx.block = block
        ctx.save_for_backward(x, y, scale, teacher_x, teacher_y, teacher_scale)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        x, y, scale, teacher_x, teacher_y, teacher_scale = ctx.saved_tensors
        grads = _InputGrads(x, y, scale, ctx.needs_input_grad[:3])
        acc = _accumulation_dtype(x.dtype)
        with _autocast_off(x):
            pairs = zip(
                _blocks(x, y, scale, ctx.block, acc),
                _blocks(teacher_x, teacher_y, teacher_scale, ctx.block, acc),
                strict=True,
            )
            for student, teacher in pairs:
                g = student.logits.softmax(1).sub_(teacher.logits.softmax(1)).mul_(grad_total)
                grads.add(student, g)
        return *grads.result(), None, None, None, None


def _signed(logits: torch.Tensor, diagonal: int) -> torch.Tensor:
    """y·logits in place: y = +1 on the positives (the block's ``diagonal``), −1 elsewhere."""
    logits.neg_().diagonal(diagonal).neg_()
    return logits
