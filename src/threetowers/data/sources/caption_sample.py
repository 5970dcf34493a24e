"""The captions a run's tokenizer is trained on: every caption of the dataset while there are
no more than ``data.tokenizer_sample``, else a sample that stops reading at that bound.

The dataset's parts (its shards; a table's rows) are read in a fixed pseudo-random order,
each in file order, until the bound is reached; the last part read gives only the captions
that fill it. The captions kept are then put back in the dataset's order (parts as listed,
captions in file order within each). So a dataset with no more captions than the bound
gives every caption in the order :func:`~threetowers.data.sources.pairs.iter_captions`
gives them (the tokenizer, and its digest, as before), and a larger one a sample that
depends on the data and the bound alone (not on ``train.seed``: runs of several seeds share
their tokenizer), read from about bound / (captions per shard) shards. Images are never read
(``iter_sample_captions``: caption members and columns only).
"""

from __future__ import annotations

import json
import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from threetowers.data.sources.pairs import PairSource, iter_sample_captions, open_pairs
from threetowers.data.sources.shards import ShardPairs
from threetowers.files.atomic import write_atomic

log = logging.getLogger(__name__)

RECORD = "tokenizer_sample.json"  # beside the run's tokenizer.json

# The order's seed, fixed: the sample is a function of the data and the bound. Its keys are
# PCG64's raw output, which numpy keeps stable across versions (Generator methods may change).
ORDER_SEED = 0


@dataclass(frozen=True)
class CaptionSample:
    """The captions kept (in the dataset's order) and what was read to find them."""

    captions: list[str]
    bound: int
    part: str  # what the dataset was read by: "shard" or "row"
    parts: int  # the dataset's shards (rows)
    parts_read: int  # those opened, the last perhaps in part
    every_caption: bool  # the dataset had no more captions than the bound: all are here

    def record(self) -> dict:
        """What the run directory keeps beside its tokenizer (``tokenizer_sample.json``)."""
        return {
            "bound": self.bound,
            "captions": len(self.captions),
            f"{self.part}s": self.parts,
            f"{self.part}s_read": self.parts_read,
            "every_caption": self.every_caption,
        }

    def save(self, folder: str | Path) -> Path:
        """Write :meth:`record` as ``folder/tokenizer_sample.json``, whole or not at all."""
        path = Path(folder) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.record(), indent=1) + "\n")
        return path


def read_order(parts: int) -> list[int]:
    """The order in which a dataset of ``parts`` shards (rows) is read: fixed per count."""
    keys = np.random.PCG64(ORDER_SEED).random_raw(parts)
    return np.argsort(keys, kind="stable").tolist()


def caption_sample(source: PairSource, bound: int) -> CaptionSample:
    """At most ``bound`` usable captions of ``source`` (see the module docstring)."""
    if bound < 1:
        raise ValueError(f"a caption sample needs a bound of at least 1, got {bound}")
    pairs = open_pairs(source)
    part, parts = (
        ("shard", len(pairs.shards)) if isinstance(pairs, ShardPairs) else ("row", len(pairs))
    )
    kept: dict[int, list[str]] = {}  # part -> its captions kept
    total, more = 0, False
    for index in read_order(parts):
        kept[index] = taken = []
        with closing(iter_sample_captions(pairs, [index])) as samples:  # closes its file
            for _, captions in samples:
                room = bound - total
                taken += captions[:room]
                total += min(room, len(captions))
                if len(captions) > room:  # a caption beyond the bound: the dataset has more
                    more = True
                    break
        if more:
            break
    captions = [caption for index in sorted(kept) for caption in kept[index]]
    if more:
        log.info(
            "the tokenizer's captions: %d, from %d of %d %ss (data.tokenizer_sample)",
            len(captions),
            len(kept),
            parts,
            part,
        )
    return CaptionSample(captions, bound, part, parts, len(kept), not more)
