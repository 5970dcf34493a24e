"""One image with its captions (:class:`Pair`), and the random numbers of a (seed, epoch):
the rng of one visit of a sample and the distinct streams that every source and the loader
draw from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from threetowers.errors import UserError

# Distinct streams for the separate uses of (seed, epoch): the sample order, the shard
# order, shuffle buffers and per-sample draws must not share random numbers.
ORDER_STREAM, SHARD_STREAM, BUFFER_STREAM, SAMPLE_STREAM = 101, 102, 103, 104
RESAMPLE_STREAM = 105


@dataclass
class Pair:
    """One image with its captions. The loader hands ``example`` a Pair with exactly one
    caption, the one picked for this visit (see :attr:`caption`).

    ``key`` is the sample's own name (a table's key, a shard member's ``KEY``); ``id`` names
    it within its dataset, which keys alone do not: shards written apart number their
    samples alike. A table's keys are unique, so there ``id`` is the key; a shard sample's
    id is ``SHARD/KEY`` (:func:`shard_sample_id`). Whatever stands for a sample (the
    feature cache's rows, preloaded rows, skipped-sample names) uses the id.
    """

    key: str
    image: Image.Image
    captions: list[str]
    id: str = ""
    # Its place in the dataset's order (a table's row; shards in the order listed, samples in
    # file order): where the feature caches keep its row. -1: not known.
    row: int = -1

    def __post_init__(self) -> None:
        self.id = self.id or self.key

    @property
    def caption(self) -> str:
        return self.captions[0]


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def check_seed(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise UserError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The rng of one visit of ``key`` (caption choice, then augmentation); independent of
    order and worker. One generator, not spawned children: spawning costs 4x as much, and the
    loader makes one per sample."""
    return np.random.default_rng([seed, epoch, SAMPLE_STREAM, _key_hash(key)])
