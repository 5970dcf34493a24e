"""Evaluation metrics on L2-normalised embeddings (similarity = dot product).

Pure functions on tensors; loading data and running models is the caller's job. All
percentages are in [0, 100].

Ranks. A query's rank for a candidate is the number of candidates scoring *strictly* higher,
and a query is a hit at k when that rank is < k. Ties therefore count in the query's favour
(two equal top scores both rank 0), which makes the metrics independent of candidate order.

Few-shot probe. Closed-form ridge regression onto centred one-hot targets with an
unpenalised bias, the L2 strength chosen by exact leave-one-out accuracy on the sampled
training shots only (see :func:`fit_probe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from threetowers.model.combination import mix

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
DEFAULT_L2_GRID = tuple(10.0**e for e in range(-6, 3))


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")


@torch.no_grad()
def retrieval(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_of_text: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image→text and text→image recall@k (%), keys ``i2t_R@k`` and ``t2i_R@k``.

    ``image_of_text[j]`` is the index of caption j's image. An image query is a hit at k when
    *any* of its captions ranks in the top k, i.e. when fewer than k texts score strictly
    above its best caption. Scores are computed ``chunk_size`` queries at a time, so memory is
    O(chunk_size · max(N, M)) rather than N·M. Every image needs at least one caption.
    """
    _check_ks(ks)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"need (N, D), (M, D) embeddings: {image_emb.shape}, {text_emb.shape}")
    image_of_text = torch.as_tensor(image_of_text, device=text_emb.device).long()
    if image_of_text.shape != (m,):
        raise ValueError(f"image_of_text must have shape ({m},), got {tuple(image_of_text.shape)}")
    if m and (image_of_text.min() < 0 or image_of_text.max() >= n):
        raise ValueError("image_of_text holds indices outside [0, N)")
    if torch.bincount(image_of_text, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    i2t_rank = torch.empty(n, dtype=torch.long, device=image_emb.device)
    for start in range(0, n, chunk_size):
        scores = image_emb[start : start + chunk_size] @ text_emb.T  # (c, M)
        rows = torch.arange(start, start + scores.shape[0], device=scores.device)
        own = image_of_text.to(scores.device)[None, :] == rows[:, None]
        best = scores.masked_fill(~own, -math.inf).amax(dim=1, keepdim=True)
        # The best caption's rank is the smallest of its captions' ranks.
        i2t_rank[start : start + scores.shape[0]] = (scores > best).sum(dim=1)

    t2i_rank = torch.empty(m, dtype=torch.long, device=text_emb.device)
    for start in range(0, m, chunk_size):
        scores = text_emb[start : start + chunk_size] @ image_emb.T  # (c, N)
        target = image_of_text[start : start + scores.shape[0]].to(scores.device)
        positive = scores.gather(1, target[:, None])
        t2i_rank[start : start + scores.shape[0]] = (scores > positive).sum(dim=1)

    out = {f"i2t_R@{k}": 100.0 * (i2t_rank < k).double().mean().item() for k in ks}
    out.update({f"t2i_R@{k}": 100.0 * (t2i_rank < k).double().mean().item() for k in ks})
    return out


@torch.no_grad()
def class_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """(C, D) prompt-ensembled class embeddings, as in CLIP.

    Each template (a format string with one ``{}``) is filled with the class name; the prompt
    embeddings are L2-normalised, averaged and renormalised, so every template weighs the same
    whatever the encoder's output norm.
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be non-empty format strings containing '{}'")
    rows = []
    for name in class_names:
        prompts = F.normalize(encode_text([t.format(name) for t in templates]), dim=-1)
        rows.append(F.normalize(prompts.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zeroshot(
    image_emb: torch.Tensor,
    class_emb: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Zero-shot top-k accuracy (%), keys ``zeroshot_top{k}``.

    A k with k >= C would be 100% by construction and says nothing, so keys with k > C are
    omitted (top-5 with 3 classes is absent; top-1 is always there).
    """
    _check_ks(ks)
    labels = torch.as_tensor(labels, device=image_emb.device).long()
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must have shape ({image_emb.shape[0]},)")
    num_classes = class_emb.shape[0]
    ranks = []
    for start in range(0, image_emb.shape[0], chunk_size):
        scores = image_emb[start : start + chunk_size] @ class_emb.T  # (c, C)
        true = scores.gather(1, labels[start : start + scores.shape[0], None])
        ranks.append((scores > true).sum(dim=1))
    rank = torch.cat(ranks)
    return {
        f"zeroshot_top{k}": 100.0 * (rank < k).double().mean().item()
        for k in ks
        if k <= num_classes
    }


@dataclass
class RidgeProbe:
    """A linear classifier ``argmax(x @ weight + bias)`` over ``classes`` (column → label)."""

    weight: torch.Tensor  # (D, C) float64
    bias: torch.Tensor  # (C,) float64
    classes: torch.Tensor  # (C,) long
    l2: float  # the chosen L2 strength λ
    loo_accuracy: float  # its leave-one-out accuracy on the training shots, %

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, torch.float64)
        return self.classes[(x @ self.weight + self.bias).argmax(dim=1)]

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        labels = torch.as_tensor(labels).to(self.classes.device).long()
        return 100.0 * (self.predict(x) == labels).double().mean().item()


def sample_shots(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``shots`` examples per class, drawn without replacement from a seeded
    generator (on the CPU, so the draw does not depend on the device)."""
    labels = torch.as_tensor(labels).long().cpu()
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < shots:
            raise ValueError(f"class {int(c)} has {len(members)} examples, fewer than {shots}")
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked)


@torch.no_grad()
def fit_probe(
    x: torch.Tensor, labels: torch.Tensor, l2_grid: Sequence[float] = DEFAULT_L2_GRID
) -> RidgeProbe:
    """Ridge regression from ``x`` to centred one-hot targets, λ picked by leave-one-out.

    Minimises (1/n) Σᵢ ‖yᵢ − W xᵢ − b‖² + λ‖W‖² with b unpenalised (so λ is per example and
    the grid does not depend on n). Ridge is linear in the targets, so its exact leave-one-out
    predictions (refits on n − 1 shots with the penalty nλ kept) come from one SVD of the
    centred features: ŷ₋ᵢ = yᵢ − (yᵢ − ŷᵢ) / (1 − Hᵢᵢ)
    with hat matrix H = 11ᵀ/n + U diag(s²/(s² + nλ)) Uᵀ. The λ with the best leave-one-out
    accuracy wins; ties (e.g. one shot, where held-out classes are unpredictable) go to the
    lower leave-one-out squared error, then to the larger λ. Only the training data is used.
    """
    if not l2_grid or min(l2_grid) <= 0:
        raise ValueError("l2_grid must hold positive values")
    x = x.to(torch.float64)
    labels = torch.as_tensor(labels, device=x.device).long()
    classes, y_index = torch.unique(labels, return_inverse=True)
    n = x.shape[0]
    y = F.one_hot(y_index, len(classes)).to(torch.float64)
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    uty = u.T @ yc  # (r, C)
    s2 = s.square()

    best = None
    for l2 in sorted(l2_grid, reverse=True):
        shrink = s2 / (s2 + n * l2)
        fitted = y_mean + u @ (shrink[:, None] * uty)
        leverage = 1.0 / n + (u.square() * shrink).sum(dim=1)
        held_out = y - (y - fitted) / (1.0 - leverage).clamp_min(1e-12)[:, None]
        accuracy = (held_out.argmax(dim=1) == y_index).double().mean().item()
        error = (held_out - y).square().sum(dim=1).mean().item()
        key = (accuracy, -error)
        if best is None or key > best[0]:  # strict: ties keep the larger λ seen first
            best = (key, l2, shrink)
    (accuracy, _), l2, shrink = best
    weight = vh.T @ ((shrink / s.clamp_min(1e-300))[:, None] * uty)  # V diag(s/(s²+nλ)) Uᵀ yc
    bias = y_mean - x_mean @ weight
    return RidgeProbe(weight, bias, classes, float(l2), 100.0 * accuracy)


def linear_probe(
    train_emb: torch.Tensor,
    train_labels: torch.Tensor,
    test_emb: torch.Tensor,
    test_labels: torch.Tensor,
    shots: int,
    seed: int = 0,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
) -> float:
    """Few-shot linear-probe top-1 accuracy (%) on frozen embeddings (store as ``fewshot_top1``).

    Samples ``shots`` training examples per class (seeded), fits :func:`fit_probe` on them
    alone (λ by leave-one-out on those shots, never on test data) and scores the test set;
    test labels outside the training classes count as errors.
    """
    index = sample_shots(train_labels, shots, seed).to(train_emb.device)
    labels = torch.as_tensor(train_labels, device=train_emb.device).long()
    probe = fit_probe(train_emb[index], labels[index], l2_grid)
    return probe.accuracy(test_emb, test_labels)


def simplex_grid(parts: int, steps: int = 10) -> list[tuple[float, ...]]:
    """Every weight vector of ``parts`` entries in multiples of 1/steps that sums to 1, the
    first entry (the main pair's weight) descending."""
    return [tuple(u / steps for u in units) for units in _compositions(parts, steps)]


def _compositions(parts: int, total: int) -> list[tuple[int, ...]]:
    """Tuples of ``parts`` non-negative integers summing to ``total``, first entry descending."""
    if parts == 1:
        return [(total,)]
    return [
        (first, *rest)
        for first in range(total, -1, -1)
        for rest in _compositions(parts - 1, total - first)
    ]


def mixture_sweep(
    images: Sequence[torch.Tensor],
    texts: Sequence[torch.Tensor],
    metric_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    grid: Sequence[Sequence[float]],
) -> list[dict]:
    """The mixed score Σᵢ wᵢ⟨imageᵢ, textᵢ⟩ evaluated at each weight vector of ``grid``:
    ``[{"weights": w, **metric_fn(mix(images, w), mix(texts, w))}, ...]``. The parts pair up
    in order: (z_f, z_g), then (z_k, z_g->k) for each frozen tower k, then (u_pimg, u_ptxt)
    for each frozen pair p; a part's width is its own (a pair's may differ from embed_dim)."""
    return [{"weights": tuple(w), **metric_fn(mix(images, w), mix(texts, w))} for w in grid]


def alpha_sweep(
    z_f: torch.Tensor,
    z_h: torch.Tensor,
    z_g: torch.Tensor,
    z_gh: torch.Tensor,
    metric_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> list[dict[str, float]]:
    """3T's α-mixed score α⟨z_f, z_g⟩ + (1−α)⟨z_h, z_gh⟩ with one frozen tower, over ``alphas``.

    Returns ``[{"alpha": α, **metrics}, ...]``; α = 1 is the main towers alone, α = 0 the
    frozen tower with the text head g_h. For retrieval pass the text embeddings and e.g.
    ``lambda i, t: retrieval(i, t, image_of_text)``. For zero-shot pass as z_g and z_gh the
    class embeddings prompt-ensembled *per head* (:func:`class_embeddings` with each head's
    encoder) and ``lambda i, c: zeroshot(i, c, labels)``: each class then scores exactly
    α·(score of head g) + (1−α)·(score of head g_h), and the endpoints equal the single-head
    zero-shot results. (Mixing per prompt before averaging would instead renormalise the
    mixed vector by a class- and α-dependent factor, breaking that identity.)
    """
    grid = [(float(a), 1.0 - float(a)) for a in alphas]
    rows = mixture_sweep((z_f, z_h), (z_g, z_gh), metric_fn, grid)
    return [{"alpha": row.pop("weights")[0], **row} for row in rows]
