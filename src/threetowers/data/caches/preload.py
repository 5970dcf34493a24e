"""Preloaded training pairs: f's view of every image decoded once, then read from memory.

Without augmentation f's view of an image never changes, yet the loader would decode, resize
and crop it again every epoch. On a two-core CPU that costs ~40% of a small model's step
(tar parsing, PNG decoding and resizing run beside the model on the same cores).
:func:`preload_pairs` decodes each image once into a uint8 array, memory-mapped from an
``.npy`` file named, like the feature cache, by the dataset's files and the view, and keeps
every caption. The result is a map-style :class:`PairTable`, so batches come from a seeded
permutation and resuming needs no I/O. Bad samples keep their rows, marked bad with their
reason, so that training skips and counts them as it would from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from threetowers.data.caches.identity import cache_base, dataset_digest
from threetowers.data.sources.bad_samples import BadDataError, BadSample, Skipped
from threetowers.data.sources.pair import Pair
from threetowers.data.sources.pairs import PairSource, epoch_size, iter_pairs
from threetowers.data.sources.table import PairTable
from threetowers.files import locks
from threetowers.files.atomic import (
    fsync,
    publish,
    remove_temporaries,
    reserve,
    temporary_path,
    write_atomic,
)
from threetowers.files.readback import read_json


class PreloadedPairs(PairTable):
    """A map-style table whose images are f's uint8 (3, S, S) views, decoded beforehand.

    ``pixels`` may be None when no tower reads images (LiT on cached h features): the
    table then serves captions only, with an empty image tensor.
    """

    def __init__(
        self,
        pixels: np.ndarray | None,
        captions: list[list[str]],
        keys: list[str],
        ids: list[str],
        name: str,
        bad: dict[int, BadSample],
    ) -> None:
        # No super().__init__: there are no image paths, and the source was checked already.
        self.pixels, self.captions, self.keys, self.name = pixels, captions, keys, name
        self.images, self.bad, self._ids = [], bad, ids

    @property
    def ids(self) -> list[str]:
        """The source's sample ids (shards: ``SHARD/KEY``, where keys may repeat)."""
        return self._ids

    def __getitem__(self, index: int) -> Pair:
        if index in self.bad:
            raise self.bad[index]
        if self.pixels is None:
            image = torch.empty(0, dtype=torch.uint8)
        else:
            image = torch.from_numpy(np.array(self.pixels[index]))  # a copy, off the memmap
        return Pair(self.keys[index], image, self.captions[index], self._ids[index], index)

    def __repr__(self) -> str:
        return f"PreloadedPairs({self.name!r}, {len(self)} pairs)"


def preload_pairs(
    source: PairSource, view, cache_dir: str | Path, progress: bool = True
) -> PreloadedPairs:
    """``source`` with every image passed through ``view`` (a transform returning uint8
    (3, S, S) pixels, or None for captions only), cached in ``cache_dir``."""
    base = cache_base(cache_dir, "pairs", {"dataset": dataset_digest(source), "view": repr(view)})
    array, index = base.with_suffix(".npy"), base.with_suffix(".json")
    if not index.exists():
        # one writer (torchrun's ranks preload at once): the others wait, then read its files
        with locks.waiting(base.parent, "preloaded pairs"):
            if not index.exists():
                _build(source, view, array, index, progress)
    meta = read_json(index)
    pixels = np.load(array, mmap_mode="r") if view is not None else None
    bad = {int(row): BadSample(*why) for row, why in meta.get("bad", {}).items()}
    return PreloadedPairs(pixels, meta["captions"], meta["keys"], meta["ids"], str(base), bad)


def _build(source: PairSource, view, array: Path, index: Path, progress: bool) -> None:
    array.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(array.parent, only_dead_writers=True)  # shared by concurrent runs
    total = epoch_size(source)
    keys, ids, captions, bad, pixels = [], [], [], {}, None
    tmp_array = temporary_path(array)
    for row, pair in enumerate(
        tqdm(iter_pairs(source), total=total, disable=not progress, desc="preloading pairs")
    ):
        if isinstance(pair, Skipped):  # its pixel row stays zero, never read
            keys.append(pair.id)  # never read: a bad row draws no caption
            ids.append(pair.id)
            captions.append([])
            bad[row] = (pair.reason, pair.detail)
            continue
        keys.append(pair.key)
        ids.append(pair.id)
        captions.append(pair.captions)
        if view is None:
            continue
        image = view(pair.image).numpy()
        if pixels is None:
            pixels = np.lib.format.open_memmap(
                tmp_array, mode="w+", dtype=np.uint8, shape=(total, *image.shape)
            )
            reserve(tmp_array, tmp_array.stat().st_size, "the preloaded images (data.preload)")
        pixels[row] = image
    if len(ids) != total:
        raise RuntimeError(f"read {len(ids)} pairs where the files hold {total}")
    if view is not None and pixels is None:
        raise BadDataError(f"none of the {total} samples of {source} has a usable image")
    if pixels is not None:
        pixels.flush()
        del pixels
        fsync(tmp_array)
        publish(tmp_array, array)
    # written last: its presence means the pair is complete
    write_atomic(index, json.dumps({"keys": keys, "ids": ids, "captions": captions, "bad": bad}))
