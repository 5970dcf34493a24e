"""A frozen pair's two sides are cached like any frozen towers: the image side a row per
sample from its pixels, the text side a row per caption, each equal to the live side."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from tests.helpers.feature_caches import live
from tests.helpers.pair_models import WORDS, save_clip
from threetowers.backbones.pair import load_transformers_pair
from threetowers.data.caches.layout import CacheSpec
from threetowers.data.caches.sharded import build_dataset_caches
from threetowers.data.caches.units import dataset_units
from threetowers.data.sources.pairs import iter_pairs


def worded_shards(folder: Path) -> Path:
    """Two shards of six samples, three captions each in the tiny pair's words (so that
    every caption has its own tokens)."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    for shard in range(2):
        with wds.TarWriter(str(folder / f"part-{shard}.tar")) as sink:
            for i in range(6):
                buffer = io.BytesIO()
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, "PNG")
                captions = [" ".join(rng.choice(WORDS, rng.integers(1, 9))) for _ in range(3)]
                sample = {"__key__": f"{i:04d}", "png": buffer.getvalue()}
                sample["json"] = json.dumps({"captions": captions}).encode()
                sink.write(sample)
    return folder


def test_cached_pair_features_equal_the_live_sides(tmp_path):
    save_clip(tmp_path / "clip")
    pair = load_transformers_pair(tmp_path / "clip")
    folder = worded_shards(tmp_path / "data")
    spec = CacheSpec(tmp_path / "cache", "float32")
    images, texts = build_dataset_caches(
        {"timg": pair.image}, {"ttxt": pair.text}, dataset_units(folder), spec, 4, progress=False
    )
    pairs = [p for p in iter_pairs(folder) if not hasattr(p, "reason")]
    assert len(pairs) == 12
    every = []
    for sample in pairs:
        cached = images["timg"].features(sample.row, sample.key)
        torch.testing.assert_close(cached, live(pair.image, sample.image), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            spoken = pair.text(sample.captions)
        rows = [texts["ttxt"].caption_features(sample.row, c) for c in sample.captions]
        torch.testing.assert_close(torch.stack(rows), spoken, rtol=1e-5, atol=1e-6)
        every.append(spoken)
    assert len(torch.unique(torch.cat(every), dim=0)) == 36  # no two captions confused
    # the two sides' caches are two folders, apart from any other tower's
    assert len({p.parent for p in (tmp_path / "cache").glob("*/*.npy")}) == 2
