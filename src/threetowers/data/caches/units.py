"""What a dataset is cut into for its caches: units of consecutive samples, each cached as
one file (a shard, a parquet file, a chunk of :data:`TABLE_CHUNK` rows of a table, or a list
of image files)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from threetowers.data.caches.identity import SAMPLE_IDS, dataset_digest, files_digest
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.decode import clean_captions, load_image
from threetowers.data.sources.fields import DEFAULT_FIELDS, Fields
from threetowers.data.sources.pairs import open_pairs
from threetowers.data.sources.shards import (
    ShardPairs,
    decode_sample,
    sample_captions,
    shard_sample_id,
    shard_samples,
)
from threetowers.data.sources.table import PairTable

TABLE_CHUNK = 8192  # rows of a table per cache unit


class Unit(Protocol):
    """Consecutive samples of a dataset cached as one file: ``start`` is its first sample's
    row in the dataset, ``size`` its number of samples. Picklable (it runs in workers)."""

    start: int
    size: int

    def identity(self) -> dict:
        """What its samples depend on (JSON-able): its file's name."""

    def samples(self) -> Iterator[tuple[str, object]]:
        """(key, decoded image) per sample in order, or (key, :class:`Skipped`) for one
        that cannot be used."""


@dataclass(frozen=True)
class ShardUnit:
    """A tar shard or a parquet file (``shards.shard_samples`` reads either); a remote tar
    shard is known by its URL with the ETag, size and time its server gives, a ``pipe:``
    command by the command (``identity.files_digest``, ``sources/remote_identity.py``)."""

    path: str  # as the source spells it (a URL or command too): part of the samples' ids
    start: int
    size: int
    fields: Fields = DEFAULT_FIELDS

    def identity(self) -> dict:
        files = {"shard": files_digest([self.path]), "ids": [SAMPLE_IDS, self.path]}
        return files | self.fields.identity()

    def samples(self) -> Iterator[tuple[str, object]]:
        for sample in shard_samples([self.path], fields=self.fields):
            try:
                pair = decode_sample(sample, self.fields)
            except BadSample as bad:
                yield sample["__key__"], bad.skipped(shard_sample_id(sample))
                continue
            yield pair.key, pair.image

    def captions(self) -> Iterator[list[str]]:
        """Each sample's usable captions in order ([] for a bad sample), images unread."""
        for sample in shard_samples([self.path], fields=self.fields, images=False):
            try:
                yield sample_captions(sample, self.fields)
            except BadSample:
                yield []


@dataclass(frozen=True)
class TableUnit:
    table: PairTable
    start: int
    size: int

    def identity(self) -> dict:
        return {"table": dataset_digest(self.table), "rows": [self.start, self.size]}

    def samples(self) -> Iterator[tuple[str, object]]:
        for row in range(self.start, self.start + self.size):
            try:
                pair = self.table[row]
            except BadSample as bad:
                yield self.table.keys[row], bad.skipped(self.table.ids[row])
                continue
            yield pair.key, pair.image

    def captions(self) -> Iterator[list[str]]:
        """Each row's usable captions in order ([] for a bad row)."""
        for row in range(self.start, self.start + self.size):
            try:
                if row in self.table.bad:
                    raise self.table.bad[row]
                yield clean_captions(self.table.captions[row], self.table.name)
            except BadSample:
                yield []


@dataclass(frozen=True)
class FilesUnit:
    """Image files (evaluation's benchmark images); keys are the paths."""

    paths: tuple[str, ...]
    start: int = 0

    @property
    def size(self) -> int:
        return len(self.paths)

    def identity(self) -> dict:
        # The rows are keyed by the paths as given: two lists naming the same files by
        # other paths (a link, a relative path) are two units, never one with wrong keys.
        paths = hashlib.sha256("\n".join(self.paths).encode()).hexdigest()
        return {"files": files_digest(self.paths), "paths": paths}

    def samples(self) -> Iterator[tuple[str, object]]:
        for path in self.paths:
            try:
                yield path, load_image(Path(path), "image")  # the key names the file
            except BadSample as bad:
                yield path, bad.skipped(path)


def dataset_units(source) -> list[Unit]:
    """A dataset as units: one per shard (or parquet file), or chunks of :data:`TABLE_CHUNK`
    rows of a table."""
    pairs = open_pairs(source)
    if isinstance(pairs, ShardPairs):
        rows = zip(pairs.shards, pairs.first_rows, pairs.sizes, strict=True)
        return [ShardUnit(str(shard), first, size, pairs.fields) for shard, first, size in rows]
    return [
        TableUnit(pairs, start, min(TABLE_CHUNK, len(pairs) - start))
        for start in range(0, len(pairs), TABLE_CHUNK)
    ]
