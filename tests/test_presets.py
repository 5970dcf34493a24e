"""The paper-scale presets (b16, l16, g14): each validates, and what its comments assume
holds of its settings: the global batch splits into the per-GPU pairs over the GPUs it
names, and the towers have the parameters and FLOPs a pair its memory and worker counts
were worked out from."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import threetowers as tt
from threetowers.config.loading import PRESETS_DIR

PAPER_SCALES = ("b16", "l16", "g14")


def comments(preset: str) -> str:
    return (PRESETS_DIR / f"{preset}.yaml").read_text()


def stated(pattern: str, preset: str) -> float:
    found = re.search(pattern, " ".join(comments(preset).split()))
    assert found, f"{preset}.yaml's comments state no {pattern!r}"
    return float(found.group(1))


@pytest.mark.parametrize("preset", PAPER_SCALES)
def test_the_global_batch_is_the_gpus_times_their_pairs(preset):
    cfg = tt.load_config(preset)
    gpus = stated(r"Assumes (\d+) GPUs of 80 GB", preset)
    per_gpu = stated(r", (\d+) pairs per GPU", preset)
    assert cfg.data.batch_size == gpus * per_gpu
    assert f"batch_size: {cfg.data.batch_size}  # global: {gpus:.0f} GPUs x {per_gpu:.0f}" in (
        comments(preset)
    )


@pytest.mark.parametrize("preset", PAPER_SCALES)
def test_a_preset_trains_past_its_warmup_in_bf16_on_gpus(preset):
    cfg = tt.load_config(preset)
    assert cfg.train.precision == "auto" and cfg.model.mode == "3t"
    assert 0 < cfg.train.warmup_steps < cfg.train.steps
    assert cfg.data.num_workers >= 1 and cfg.data.cache  # h's features cached


def counted(preset: str) -> tuple[int, int]:
    """Trained parameters and FLOPs of one pair's forward and backward (full captions),
    counted on the meta device: nothing allocated."""
    cfg = tt.load_config(preset, ["model.mode=clip"])  # 3t's heads add under 1%
    with torch.device("meta"):
        model = tt.build_model(cfg)
    size, context = cfg.model.image.image_size, cfg.model.text.context_length
    images = torch.zeros(1, 3, size, size, device="meta")
    tokens = torch.ones(1, context, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = model.loss(model(images, tokens))
        loss.backward()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, counter.get_total_flops()


@pytest.mark.parametrize("preset", PAPER_SCALES)
def test_the_stated_parameters_and_flops_are_the_towers(preset):
    trained, flops = counted(preset)
    number, unit = re.search(r"\(([\d.]+)([MB]) trained parameters\)", comments(preset)).groups()
    assert trained == pytest.approx(float(number) * {"M": 1e6, "B": 1e9}[unit], rel=0.01)
    assert flops == pytest.approx(stated(r"a pair costs (\d+) GFLOPs", preset) * 1e9, rel=0.01)
