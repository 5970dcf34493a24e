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
the whole batch's, up to float rounding. The frozen towers run once, on the whole batch, as
without accumulation (no gradient reaches them). Randomness in the towers replays: each
micro-batch's second pass starts from the RNG state its first pass started from.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from threetowers.model.three_towers import ThreeTowers


def backward_in_micro_batches(
    model: ThreeTowers,
    forward,
    tensors: dict,
    counts: list[int],
    micro_batch: int,
    autocast,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole batch's (loss, logs), its gradients accumulated in the parameters' ``.grad``
    micro-batch by micro-batch; ``forward`` is the model or its DDP wrapper, ``autocast`` a
    callable giving the step's precision context."""
    images, tokens = tensors.get("images"), tensors["tokens"]
    with autocast():
        frozen = model.frozen_features(
            images,
            tensors.get("frozen_features"),
            tensors.get("frozen_images"),
            tensors["captions"],
        )
    parts = micro_batches(len(tokens), counts, micro_batch)

    def embeddings(part: slice, through) -> dict[str, torch.Tensor]:
        given = {name: features[part] for name, features in frozen.items()}
        pixels = images[part] if images is not None else None
        return through(pixels, tokens[part], frozen_features=given)

    starts, pieces = [], []
    with torch.no_grad(), autocast():
        for part in parts:
            starts.append(_rng_state(tokens.device))
            pieces.append(embeddings(part, model))
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
            with autocast():
                piece = embeddings(part, forward)
            used = [key for key in piece if piece[key].requires_grad and out[key].grad is not None]
            torch.autograd.backward(
                [piece[key] for key in used], [out[key].grad[part] for key in used]
            )
    _set_rng_state(after, tokens.device)
    return loss, logs


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
