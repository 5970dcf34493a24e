"""Training-step time and model FLOPs of clip, lit and 3t (live h and cached h) at one config.

Every mode gets the same towers, batch and synthetic inputs, so the ratios to clip measured in
one run compare like with like on whatever machine runs them. FLOPs come from
``torch.utils.flop_counter`` over one forward and backward (matmuls, convolutions,
attention), the numerator of MFU.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import threetowers as tt
from threetowers.config import Config
from threetowers.optim import make_optimizer

# name -> (mode, h's features precomputed)
VARIANTS = {
    "clip": ("clip", False),
    "lit": ("lit", True),
    "3t_cached": ("3t", True),
    "3t_live": ("3t", False),
}


def _model_and_batch(cfg: Config, variant: str, device: torch.device):
    mode, cached = VARIANTS[variant]
    model = tt.build_model(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"mode": mode})})
    )
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    batch_size, context = cfg.data.batch_size, cfg.model.text.context_length
    tokens = torch.randint(4, cfg.model.text.vocab_size, (batch_size, context), generator=generator)
    # Captions are trimmed to the batch's longest (TrainingData.batches): two thirds is typical.
    batch = {"tokens": tokens[:, : context * 2 // 3]}
    if mode != "lit":
        size = cfg.model.image.image_size
        batch["images"] = torch.randn(batch_size, 3, size, size, generator=generator)
    if mode != "clip":
        h = model.third_tower
        size = h.preprocessing.image_size
        third = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
        if cached:
            with torch.no_grad():  # inference-mode tensors could not enter the loss's graph
                batch["third_features"] = h(third)
        else:
            batch["third_images"] = third
    return model, {k: v.to(device) for k, v in batch.items()}


def _forward_backward(model, batch: dict) -> None:
    out = model(
        batch.get("images"),
        batch["tokens"],
        third_features=batch.get("third_features"),
        third_images=batch.get("third_images"),
    )
    loss, _ = model.loss(out)
    loss.backward()


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model, batch: dict, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of a full optimiser step after ``warmup`` steps."""
    optimizer, schedule = make_optimizer(model, 1e-4, 0.1, 1, 1000)
    times = []
    for i in range(warmup + repeats):
        _synchronise(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _forward_backward(model, batch)
        optimizer.step()
        schedule.step()
        _synchronise(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_flops(model, batch: dict) -> int:
    """Model FLOPs of one forward and backward (the frozen h's forward included)."""
    counter = FlopCounterMode(display=False)
    with counter:
        _forward_backward(model, batch)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(cfg: Config, device: torch.device, repeats: int) -> dict:
    """Per variant: seconds per step, pairs/s and FLOPs per step; and the ratios to clip."""
    out: dict = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model, batch = _model_and_batch(cfg, variant, device)
        seconds = step_seconds(model, batch, device, repeats)
        flops = step_flops(model, batch)
        out[variant] = {
            "step_seconds": seconds,
            "pairs_per_s": cfg.data.batch_size / seconds,
            "flops_per_step": flops,
            "achieved_gflops": flops / seconds / 1e9,
        }
    clip = out["clip"]["step_seconds"]
    for variant in ("lit", "3t_cached", "3t_live"):
        out[f"step_time_ratio_{variant}_vs_clip"] = out[variant]["step_seconds"] / clip
    return out
