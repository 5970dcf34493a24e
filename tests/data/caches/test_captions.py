"""A frozen text tower's caption cache: a row for every caption of every sample, equal to the
live tower, found by the sample's row and the caption's text, kept per unit; built on CUDA
too."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from threetowers.data.caches.captions import build_caption_caches
from threetowers.data.caches.layout import CacheSpec
from threetowers.data.caches.streamed_features import UnitMismatch
from threetowers.data.caches.units import dataset_units
from threetowers.data.sources.pairs import iter_pairs


def captioned_shards(folder: Path) -> Path:
    """Two shards; samples with five captions each (a .json list), one without any."""
    folder.mkdir()
    noise = np.random.default_rng(1)
    for shard in range(2):
        with wds.TarWriter(str(folder / f"part-{shard}.tar")) as sink:
            for i in range(6):
                buffer = io.BytesIO()
                Image.fromarray(noise.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    buffer, "PNG"
                )
                sample = {"__key__": f"{i:04d}", "png": buffer.getvalue()}
                if (shard, i) != (1, 2):  # this one has no caption: a bad sample
                    captions = [f"shard {shard} picture {i} caption {c}" for c in range(5)]
                    sample["json"] = json.dumps({"captions": captions}).encode()
                sink.write(sample)
    return folder


def test_every_caption_has_the_live_towers_row(tmp_path, tiny_text_encoder):
    tower = tiny_text_encoder
    folder = captioned_shards(tmp_path / "data")
    spec = CacheSpec(tmp_path / "cache", "float32")
    cache = build_caption_caches({"t": tower}, dataset_units(folder), spec, 4, False)["t"]
    pairs = [pair for pair in iter_pairs(folder) if not hasattr(pair, "reason")]
    assert len(pairs) == 11
    for pair in pairs:
        live = tower(pair.captions)
        cached = torch.stack([cache.caption_features(pair.row, c) for c in pair.captions])
        torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    with pytest.raises(UnitMismatch, match="no row for the caption"):
        cache.caption_features(pairs[0].row, "a caption this dataset never had")
    half = build_caption_caches(
        {"t": tower}, dataset_units(folder), CacheSpec(tmp_path / "cache"), 4, False
    )["t"]
    row = cache.caption_features(0, pairs[0].captions[0])
    assert torch.equal(half.caption_features(0, pairs[0].captions[0]), row.half().float())


def test_a_missing_unit_alone_is_built_again(tmp_path, tiny_text_encoder, monkeypatch):
    tower = tiny_text_encoder
    folder = captioned_shards(tmp_path / "data")
    spec = CacheSpec(tmp_path / "cache")
    cache = build_caption_caches({"t": tower}, dataset_units(folder), spec, 4, False)["t"]
    Path(cache.units[1].index).unlink()
    calls = []
    original = type(tower).forward
    monkeypatch.setattr(
        type(tower),
        "forward",
        lambda self, c: calls.append(len(c)) or original(self, c),
    )
    build_caption_caches({"t": tower}, dataset_units(folder), spec, 4, False)
    assert sum(calls) == 25  # the second shard's five captioned samples, five captions each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_text_tower_on_cuda_caches_the_rows_it_computes_on_the_cpu(
    tmp_path, tiny_text_encoder, precision
):
    folder = captioned_shards(tmp_path / "data")
    units = dataset_units(folder)
    cpu = build_caption_caches(
        {"t": tiny_text_encoder}, units, CacheSpec(tmp_path / "cpu", "float32"), 4, False
    )["t"]
    spec = CacheSpec(tmp_path / "cuda", "float32", precision=precision)
    tower = copy.deepcopy(tiny_text_encoder).cuda()
    cuda = build_caption_caches({"t": tower}, units, spec, 4, False)["t"]
    pairs = [pair for pair in iter_pairs(folder) if not hasattr(pair, "reason")]
    for pair in pairs:
        on_cpu = torch.stack([cpu.caption_features(pair.row, c) for c in pair.captions])
        on_cuda = torch.stack([cuda.caption_features(pair.row, c) for c in pair.captions])
        tolerance = 1e-4 if precision == "fp32" else 3e-2
        torch.testing.assert_close(on_cuda, on_cpu, rtol=tolerance, atol=tolerance)
