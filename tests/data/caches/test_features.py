"""The identity of a dataset's files, which names every cache made from them, and the
feature cache's rows: one per sample, never shared by samples whose keys are alike."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from tests.conftest import tiny_backbone
from threetowers.data.caches.features import feature_cache, files_digest
from threetowers.data.sources.pairs import iter_pairs
from threetowers.data.transforms import eval_transform


def resolved_one_by_one(paths) -> str:
    """The identity as first defined: caches and checkpoints already hold it, so it must
    not change."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            digest.update(f"{Path(path).resolve()}|missing\n".encode())
            continue
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def test_files_digest_is_the_resolved_identity_of_each_file(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "real" / name).write_bytes(name.encode() * 3)
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "c.png").symlink_to(tmp_path / "real" / "a.png")
    monkeypatch.chdir(tmp_path)
    paths = [
        tmp_path / "real" / "a.png",
        "linked/b.png",  # relative, through a linked folder
        Path("real") / "c.png",  # a linked file: its target's identity
        "real//./b.png",
        tmp_path / "real" / "gone.png",
    ]
    assert files_digest(paths) == resolved_one_by_one(paths)
    before = files_digest(paths)
    (tmp_path / "real" / "b.png").write_bytes(b"edited, and longer")
    assert files_digest(paths) != before


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


def test_samples_of_shards_that_share_keys_keep_their_own_features(tmp_path):
    folder = colliding_shards(tmp_path / "data")
    h = tiny_backbone()
    cache = feature_cache(h, folder, tmp_path / "cache", batch_size=7, progress=False)
    assert len(cache.row) == 20 and len(torch.unique(cache.features, dim=0)) == 20
    view = eval_transform(h.preprocessing)
    with torch.no_grad():
        for pair in iter_pairs(folder):  # each sample's row is h of its own image
            live = h(view(pair.image)[None])
            torch.testing.assert_close(cache.lookup([pair.id]), live, rtol=1e-5, atol=1e-6)
