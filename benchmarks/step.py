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
from threetowers.trainer.optim import make_optimizer

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
    batch = {k: v.to(device) for k, v in batch.items()}
    for name, h in model.frozen.items():
        size = h.preprocessing.image_size
        view = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
        if cached:
            with torch.no_grad():  # inference-mode tensors could not enter the loss's graph
                batch.setdefault("frozen_features", {})[name] = h(view)
        else:
            batch.setdefault("frozen_images", {})[name] = view
    return model, batch


def _forward_backward(model, batch: dict) -> None:
    out = model(
        batch.get("images"),
        batch["tokens"],
        frozen_features=batch.get("frozen_features"),
        frozen_images=batch.get("frozen_images"),
    )
    loss, _ = model.loss(out)
    loss.backward()


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stepper:
    """One variant's model, batch and optimiser, stepped one timed step at a time."""

    def __init__(self, model, batch: dict, device: torch.device) -> None:
        self.model, self.batch, self.device = model, batch, device
        self.optimizer, self.schedule = make_optimizer(model, 1e-4, 0.1, 1, 1000)

    def timed_step(self) -> float:
        _synchronise(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        _forward_backward(self.model, self.batch)
        self.optimizer.step()
        self.schedule.step()
        _synchronise(self.device)
        return time.perf_counter() - start


def step_flops(model, batch: dict) -> int:
    """Model FLOPs of one forward and backward (the frozen h's forward included)."""
    counter = FlopCounterMode(display=False)
    with counter:
        _forward_backward(model, batch)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(cfg: Config, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Per variant: seconds per step, pairs/s and FLOPs per step; and the ratios to clip.

    The variants take turns step by step, so drift in the machine's speed (and the first
    variant's cold caches) fall on every variant alike instead of on whichever runs first;
    the ratios pair the steps of each round.
    """
    steppers = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        steppers[variant] = _Stepper(*_model_and_batch(cfg, variant, device), device)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(warmup + repeats):
        for variant, stepper in steppers.items():
            seconds = stepper.timed_step()
            if round_ >= warmup:
                times[variant].append(seconds)
    out: dict = {}
    for variant, stepper in steppers.items():
        seconds = statistics.median(times[variant])
        flops = step_flops(stepper.model, stepper.batch)
        out[variant] = {
            "step_seconds": seconds,
            "pairs_per_s": cfg.data.batch_size / seconds,
            "flops_per_step": flops,
            "achieved_gflops": flops / seconds / 1e9,
        }
    for variant in ("lit", "3t_cached", "3t_live"):
        # The median of each round's own ratio: a slow moment of the machine then weighs on
        # both steps of its round instead of on whichever variant's median it lands in.
        rounds = zip(times[variant], times["clip"], strict=True)
        ratio = statistics.median(seconds / clip for seconds, clip in rounds)
        out[f"step_time_ratio_{variant}_vs_clip"] = ratio
    return out
