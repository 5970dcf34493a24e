"""Batches go to the device as uint8 and are normalised there: the same floats, batch for
batch, as the transforms' own float path (every view: f's random crop, a live frozen
tower's), on the CPU here and on CUDA where there is one; one batch ahead on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.runs import tiny_run_config
from threetowers.data.device import FROZEN_IMAGES, on_device
from threetowers.data.pipeline import TrainingData, open_data
from threetowers.data.sources.pair import sample_rng
from threetowers.data.sources.pairs import iter_pairs
from threetowers.data.transforms import eval_transform, train_transform
from threetowers.model.build import build_model
from threetowers.project.world.default import default_world
from threetowers.trainer.start import towers_of

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def live_3t(tmp_path_factory):
    """A 3t run whose frozen tower runs live: f's view is a random crop, h's its own."""
    root = tmp_path_factory.mktemp("live")
    cfg = tiny_run_config(root / "world", root / "cache", "model.mode=3t", "data.cache=false")
    model = build_model(cfg)
    data = TrainingData(cfg, open_data(cfg, root / "run", default_world(cfg)), towers_of(model))
    return cfg, model, data


def float_path(cfg, model, data, ids: list[str]) -> tuple[torch.Tensor, dict]:
    """The batch as the float transforms make it, sample by sample, from the full decode."""
    pairs = {pair.id: pair for pair in iter_pairs(data.source)}
    crop = train_transform(model.image_preprocessing, scale=tuple(cfg.data.crop_scale))
    images, frozen = [], {name: [] for name in data.views.frozen}
    for sample in ids:
        pair = pairs[sample]
        rng = sample_rng(cfg.train.seed, 0, pair.key)
        rng.integers(len(pair.captions))  # the loader draws the caption first
        images.append(crop(pair.image, rng))
        for name in frozen:
            frozen[name].append(eval_transform(model.frozen[name].preprocessing)(pair.image))
    return torch.stack(images), {name: torch.stack(views) for name, views in frozen.items()}


def check_equal_to_the_float_path(live_3t, device: torch.device) -> None:
    cfg, model, data = live_3t
    checked = 0
    for batch in on_device(data.batches(0, 0), device, data.views):
        images, frozen = float_path(cfg, model, data, batch["ids"])
        assert batch["images"].device.type == device.type
        assert torch.equal(batch["images"].cpu(), images)
        assert set(batch[FROZEN_IMAGES]) == set(frozen) == {"h"}
        for name, views in frozen.items():
            assert torch.equal(batch[FROZEN_IMAGES][name].cpu(), views)
        checked += 1
    assert checked >= 2


def test_uint8_batches_normalised_on_the_device_equal_the_float_transforms(live_3t):
    _, _, data = live_3t
    batch = next(data.batches(0, 0))
    assert batch["images"].dtype == torch.uint8  # a quarter of float32's bytes to copy
    assert batch[FROZEN_IMAGES]["h"].dtype == torch.uint8
    check_equal_to_the_float_path(live_3t, torch.device("cpu"))


@CUDA
def test_cuda_batches_one_ahead_equal_the_float_transforms(live_3t):
    check_equal_to_the_float_path(live_3t, torch.device("cuda"))


@CUDA
def test_the_batch_ahead_is_copied_while_the_step_before_works(live_3t):
    """Each batch is handed over only once the next one's copy is issued, and the caller's
    stream waits for its own copy: reading it right after is correct without a sync."""
    _, _, data = live_3t
    device = torch.device("cuda")
    fed = on_device(data.batches(0, 0), device, data.views)
    first = next(fed)
    assert first["images"].is_cuda and first["tokens"].is_cuda
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(20):  # keep the caller's stream busy while the next copy goes
        busy = busy @ busy.T / 4096
    second = next(fed)
    reference = on_device(data.batches(0, 0), torch.device("cpu"), data.views)
    next(reference)
    assert torch.equal(second["images"].cpu(), next(reference)["images"])
    assert np.isfinite(float(busy.sum()))
