"""Shards whose keys collide, and building feature caches from them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from threetowers.data.caches.features import build_caches
from threetowers.data.caches.layout import CacheSpec
from threetowers.data.caches.units import dataset_units
from threetowers.data.transforms import eval_transform


def colliding_shards(folder: Path, samples: int = 10) -> Path:
    """Two img2dataset outputs side by side: both number their samples from 000000000, with
    other images and captions."""
    folder.mkdir()
    noise = np.random.default_rng(7)
    for dataset in ("cc3m", "cc12m"):
        with wds.TarWriter(str(folder / f"{dataset}-000000.tar")) as sink:
            for i in range(samples):
                pixels = noise.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "PNG")
                caption = f"{dataset} picture number {i}".encode()
                sink.write({"__key__": f"{i:09d}", "png": buffer.getvalue(), "txt": caption})
    return folder


def live(tower, image) -> torch.Tensor:
    with torch.no_grad():
        return tower(eval_transform(tower.preprocessing)(image)[None])[0]


def build(tower, source, directory, dtype="float32", **options):
    towers = tower if isinstance(tower, dict) else {"h": tower}
    spec = CacheSpec(directory, dtype)
    return build_caches(
        towers, dataset_units(source), spec, batch_size=7, progress=False, **options
    )
