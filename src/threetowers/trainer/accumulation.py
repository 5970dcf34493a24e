"""Exact gradient accumulation over micro-batches, in the way of GradCache (Gao et al., 2021).

A contrastive loss couples every pair of the batch, so a micro-batch cannot take a loss of
its own. Instead, for a local batch cut into micro-batches of ``train.micro_batch`` rows:

1. every micro-batch's embeddings, without a graph;
2. the whole batch's loss on them (every term, gathered across ranks, blocked or not) and its
   backward to the embeddings (and to the loss's own scales and biases);
3. each micro-batch again, with a graph, its embeddings' gradients backpropagated through
   the towers; under DDP gradients are averaged once, with the last micro-batch; under FSDP
   each pass reduces its gradients into the shards (holding the whole gradients unsharded
   until the last would undo the sharding).

Every rank makes the same number of passes (:func:`micro_batches`), as FSDP gathers the
weights in each.

The towers' activations are then held for one micro-batch at a time, and the gradients are
the whole batch's, up to float rounding. The frozen towers run once, in the first pass, a
micro-batch at a time too (no gradient reaches them; their features are kept for the second).
A batch that comes uint8 has each micro-batch's views normalised as the pass reaches it, so
the whole batch is never held in floats. Randomness in the towers replays: each
micro-batch's second pass starts from the RNG state its first pass started from.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from threetowers.data.device import FROZEN_FEATURES, FROZEN_IMAGES
from threetowers.model.three_towers import ThreeTowers


def backward_in_micro_batches(
    model: ThreeTowers,
    forward,
    tensors: dict,
    counts: list[int],
    micro_batch: int,
    autocast,
    normalise: Callable[[dict], dict] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole batch's (loss, logs), its gradients accumulated in the parameters' ``.grad``
    micro-batch by micro-batch; ``forward`` is the model or its DDP wrapper, ``autocast`` a
    callable giving the step's precision context; ``normalise``: the micro-batch's uint8
    views to floats, for a batch that came uint8 (``data/device.py``)."""
    tokens = tensors["tokens"]
    parts = micro_batches(len(tokens), counts, micro_batch)

    def inputs(part: slice) -> dict:
        piece = _sliced(tensors, part)
        return normalise(piece) if normalise is not None else piece

    frozen, starts, pieces = [], [], []
    with torch.no_grad(), autocast():
        for part in parts:
            piece = inputs(part)
            frozen.append(
                model.frozen_features(
                    piece.get("images"),
                    piece.get(FROZEN_FEATURES),
                    piece.get(FROZEN_IMAGES),
                    piece["captions"],
                )
            )
            starts.append(_rng_state(tokens.device))
            pieces.append(model(piece.get("images"), piece["tokens"], frozen_features=frozen[-1]))
    out = {key: torch.cat([piece[key] for piece in pieces]).requires_grad_() for key in pieces[0]}
    with autocast():
        loss, logs = model.loss(out, counts)
    loss.backward()
    after = _rng_state(tokens.device)
    last = len(parts) - 1
    for index, (part, start) in enumerate(zip(parts, starts, strict=True)):
        _set_rng_state(start, tokens.device)
        synchronised = index == last or not hasattr(forward, "no_sync")
        with nullcontext() if synchronised else forward.no_sync():
            piece = inputs(part)
            with autocast():
                embedded = forward(
                    piece.get("images"), piece["tokens"], frozen_features=frozen[index]
                )
            used = [k for k in embedded if embedded[k].requires_grad and out[k].grad is not None]
            torch.autograd.backward(
                [embedded[key] for key in used], [out[key].grad[part] for key in used]
            )
    _set_rng_state(after, tokens.device)
    return loss, logs


def _sliced(tensors: dict, part: slice) -> dict:
    """The micro-batch ``part`` of a batch's rows: its views, captions and features."""
    piece = {"tokens": tensors["tokens"][part], "captions": tensors["captions"][part]}
    if tensors.get("images") is not None:
        piece["images"] = tensors["images"][part]
    for key in (FROZEN_FEATURES, FROZEN_IMAGES):
        if key in tensors:
            piece[key] = {name: rows[part] for name, rows in tensors[key].items()}
    return piece


def micro_batches(rows: int, counts: list[int], micro_batch: int) -> list[slice]:
    """This rank's ``rows`` cut into as many micro-batches of at most ``micro_batch`` rows as
    the rank with most rows needs (``counts``: every rank's), near-equal in size: every rank
    makes the same number of passes, which FSDP's gathers in each pass need (a rank left
    with fewer rows than passes makes some of them empty)."""
    passes = max(-(-count // micro_batch) for count in counts)
    bounds = [part * rows // passes for part in range(passes + 1)]
    return [slice(start, end) for start, end in zip(bounds, bounds[1:], strict=False)]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
