"""Batches on their way to the device: uint8 pixels until they are there, normalised there,
one batch ahead.

The loader hands uint8 pixels, a quarter of float32's bytes. On CUDA they leave pinned
memory (the loader's ``pin_memory``) asynchronously on a side stream, and each image view's
normalisation (``Preprocessing.normalize_pixels``: the same operations as on the CPU, so the
same floats) runs there too, while the step before is still computing. On the CPU the device is the
host: nothing is copied, and the normalisation is the first of the step's work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from threetowers.data.views import Views

# A batch's per-tower dicts: cached features and live views, by frozen tower name.
FROZEN_FEATURES, FROZEN_IMAGES = "frozen_features", "frozen_images"


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors (also those in its per-tower dicts) on ``device``; asynchronous
    from pinned memory."""
    return {
        key: to_device(value, device)
        if isinstance(value, dict)
        else value.to(device, non_blocking=True)
        if torch.is_tensor(value)
        else value
        for key, value in batch.items()
    }


def normalised(batch: dict, views: Views) -> dict:
    """A prepared batch's uint8 views as each tower's normalised float32, where they are."""
    if not batch["ids"]:  # only bad samples: nothing to normalise
        return batch
    return normalised_views(batch, views)


def normalised_views(batch: dict, views: Views) -> dict:
    """``batch``'s image views (of any rows, none included) normalised, in place."""
    if views.normalise is not None:
        batch["images"] = views.normalise(batch["images"])
    if FROZEN_IMAGES in batch:
        live = batch[FROZEN_IMAGES]
        batch[FROZEN_IMAGES] = {name: views.frozen_normalise[name](live[name]) for name in live}
    return batch


def on_device(batches: Iterable[dict], device: torch.device, views: Views | None) -> Iterator[dict]:
    """``batches`` on ``device``, normalised there (``views`` None: left uint8, for the step
    to normalise a micro-batch at a time); on CUDA one batch ahead, its copy and
    normalisation issued on a side stream while the caller works on the batch before."""

    def arrived(batch: dict) -> dict:
        batch = to_device(batch, device)
        return batch if views is None else normalised(batch, views)

    if device.type != "cuda":
        for batch in batches:
            yield arrived(batch)
        return
    side = torch.cuda.Stream(device)
    ahead = None
    for batch in batches:
        with torch.cuda.stream(side):
            ready = (arrived(batch), side.record_event())
        if ahead is not None:
            yield _handed_over(*ahead, device)
        ahead = ready
    if ahead is not None:
        yield _handed_over(*ahead, device)


def _handed_over(batch: dict, copied: torch.cuda.Event, device: torch.device) -> dict:
    """The side stream's batch, safe on the caller's stream: that stream waits for this
    batch's copy (not the next one's), and the allocator keeps each tensor's memory until the
    caller's work on it is done."""
    current = torch.cuda.current_stream(device)
    current.wait_event(copied)
    for tensor in _tensors(batch):
        tensor.record_stream(current)
    return batch


def _tensors(batch: dict) -> Iterator[torch.Tensor]:
    for value in batch.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif torch.is_tensor(value):
            yield value
