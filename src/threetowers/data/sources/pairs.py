"""Opening a dataset of image-caption pairs, whatever its form, and reading it through once.

Sources
    * :class:`~threetowers.data.sources.table.PairTable` (map-style): a CSV/TSV/JSONL table.
    * :class:`~threetowers.data.sources.shards.ShardPairs` (streaming): local webdataset
      ``.tar`` shards.

Samples that cannot be used (see ``bad_samples.py``) raise :class:`BadSample` where they
are decoded; the loader skips and counts them. The resumable, rank- and worker-split loader
over these sources is in ``loader.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import webdataset as wds

from threetowers.data.sources.bad_samples import BadSample, Skipped
from threetowers.data.sources.decode import clean_captions
from threetowers.data.sources.fields import DEFAULT_FIELDS, Fields
from threetowers.data.sources.pair import Pair
from threetowers.data.sources.shards import (
    ShardPairs,
    decode_sample,
    sample_captions,
    shard_sample_id,
    shard_samples,
)
from threetowers.data.sources.table import PairTable

PairSource = PairTable | ShardPairs | str | Path | Sequence[str | Path]


def iter_pairs(source: PairSource) -> Iterator[Pair | Skipped]:
    """Every sample of a dataset in file order: a decoded Pair with all its captions, or
    the Skipped record of a bad one."""
    pairs = open_pairs(source)
    if isinstance(pairs, PairTable):
        for index in range(len(pairs)):
            try:
                item = pairs[index]
            except BadSample as bad:
                item = bad.skipped(pairs.ids[index])
            yield item
        return
    for sample in shard_samples(pairs.shards, pairs.first_rows):
        try:
            item = decode_sample(sample, pairs.fields)
        except BadSample as bad:
            item = bad.skipped(shard_sample_id(sample))
        yield item


def iter_captions(source: PairSource) -> Iterator[str]:
    """Every usable caption of a dataset, without decoding an image (to train a tokenizer).
    Bad samples are passed over silently here: the passes that use them count them."""
    pairs = open_pairs(source)
    if isinstance(pairs, PairTable):
        for index, captions in enumerate(pairs.captions):
            if index not in pairs.bad:
                with contextlib.suppress(BadSample):
                    yield from clean_captions(captions, pairs.name)
        return
    for sample in shard_samples(pairs.shards):
        with contextlib.suppress(BadSample):
            yield from sample_captions(sample, pairs.fields)


def open_pairs(
    source: PairSource,
    *,
    fields: Fields = DEFAULT_FIELDS,
    allow_absolute_paths: bool = False,
) -> PairTable | ShardPairs:
    """Open ``source``: a ``.csv``/``.tsv``/``.jsonl`` table, a directory of ``*.tar``
    shards, a shard path or brace pattern (``train-{000000..000009}.tar``), or a list of
    shard paths; ``fields`` says where each sample's image and captions are. Already opened
    sources are returned as they are. A table's image paths must stay inside its folder
    unless ``allow_absolute_paths``."""
    if isinstance(source, (PairTable, ShardPairs)):
        return source
    if isinstance(source, (list, tuple)):
        not_tar = [str(s) for s in source if not str(s).endswith(".tar")]
        if not_tar:
            raise ValueError(f"a list source must hold .tar shards; got {not_tar[:3]}")
        return ShardPairs(source, fields)
    path = Path(source)
    text = str(source)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no *.tar shards in directory {path}")
        return ShardPairs(shards, fields)
    if "{" in text:
        return ShardPairs(wds.shardlists.expand_urls(text), fields)
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return ShardPairs([path], fields)
    if suffix in (".csv", ".tsv"):
        return PairTable.from_csv(path, fields, allow_absolute_paths=allow_absolute_paths)
    if suffix == ".jsonl":
        return PairTable.from_jsonl(path, fields, allow_absolute_paths=allow_absolute_paths)
    if not path.exists():
        raise FileNotFoundError(f"pairs source not found: {path}")
    raise ValueError(
        f"unknown pairs format {path.name!r}: expected .csv, .tsv, .jsonl, .tar, a brace "
        "pattern of .tar shards, or a directory of .tar shards"
    )


def epoch_size(source: PairSource) -> int:
    """Number of pairs in one epoch over all ranks (shards: counted from tar headers)."""
    return len(open_pairs(source))
