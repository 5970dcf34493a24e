"""Streaming pairs from local webdataset ``.tar`` shards as img2dataset writes them:
``KEY.jpg`` (or another image member) and ``KEY.txt``, optionally ``KEY.json``, whose
``"captions"`` list, when present, replaces the ``.txt`` caption; ``data.image_key`` and
``data.caption_key`` name other members or ``.json`` fields (fields.py). Members are read
only within their size limits (1 MiB of text or metadata, 64 MiB of image: see
``tar_samples``).

A ``.parquet`` file is a shard too (``parquet_samples``: its rows are its samples): it is
counted, streamed and decoded here by its suffix, so everything built on shards (the
loader's plans and resume, the feature caches' units, bad-sample names) serves both. One
source holds one kind."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from threetowers.data.sources import parquet_samples
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.decode import caption_text, clean_captions, is_utf8, load_image
from threetowers.data.sources.fields import CAPTION_MEMBERS, DEFAULT_FIELDS, Fields
from threetowers.data.sources.pair import SHARD_STREAM, Pair, check_seed
from threetowers.data.sources.parquet_samples import is_parquet
from threetowers.data.sources.tar_samples import count_samples, read_samples


def shard_sample_id(sample: dict[str, Any]) -> str:
    """The id of a raw shard sample: its shard's path as the source lists it, then its key."""
    return f"{sample.get('__url__', '?')}/{sample['__key__']}"


_COUNT_CACHE: dict[tuple[str, int, int], int] = {}


def count_shard_samples(path: str | Path) -> int:
    """Samples in one tar from its headers alone (see ``tar_samples``), or in one parquet
    file from its footer, cached per (path, size, mtime). Every key is a sample, with or
    without an image: those without are streamed, then skipped and counted as bad."""
    path = Path(path)
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _COUNT_CACHE:
        counter = parquet_samples.count_samples if is_parquet(path) else count_samples
        _COUNT_CACHE[cache_key] = counter(path)
    return _COUNT_CACHE[cache_key]


class ShardPairs:
    """Local webdataset shards, or parquet files, in the order given (shuffled per epoch by
    the loader). Parquet files are checked for their columns here, from their footers."""

    def __init__(self, shards: Sequence[str | Path], fields: Fields = DEFAULT_FIELDS) -> None:
        shards = [Path(s) for s in shards]
        if not shards:
            raise ValueError("no shards given")
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(shards)} shards not found, e.g. {missing[:3]}"
            )
        repeated = [str(s) for s, n in Counter(shards).items() if n > 1]
        if repeated:  # its samples would be two samples of one id (see Pair)
            raise ValueError(f"shards listed more than once: {repeated[:3]}; list each once")
        parquet = [s for s in shards if is_parquet(s)]
        if parquet and len(parquet) < len(shards):
            other = next(s for s in shards if not is_parquet(s))
            raise ValueError(
                f"a source is either webdataset shards or parquet files, not both: "
                f"{len(parquet)} of {len(shards)} are .parquet files (e.g. {parquet[0]}) and the "
                f"others not (e.g. {other}); train on one kind"
            )
        for path in parquet:
            parquet_samples.check_columns(path, fields)
        self.shards, self.fields = shards, fields

    @cached_property
    def sizes(self) -> list[int]:
        """Samples per shard (reads tar headers, or parquet footers, once)."""
        return [count_shard_samples(shard) for shard in self.shards]

    @cached_property
    def first_rows(self) -> list[int]:
        """Each shard's first row in the dataset's order."""
        return np.cumsum([0, *self.sizes[:-1]]).tolist()

    def __len__(self) -> int:
        return sum(self.sizes)

    def shard_order(self, seed: int, epoch: int) -> list[int]:
        """Indices of the shards in the epoch's order, the same on every rank."""
        check_seed(seed, epoch)
        state = np.random.SeedSequence([seed, epoch, SHARD_STREAM]).generate_state(2, np.uint64)
        urls = [str(i) for i in range(len(self.shards))]
        # webdataset's own seeded shard shuffle, run here so every rank can plan the epoch.
        shuffled = wds.SimpleShardList(urls, seed=int(state[0]) << 64 | int(state[1]))
        return [int(entry["url"]) for entry in shuffled]

    def __repr__(self) -> str:
        kind = "parquet files" if is_parquet(self.shards[0]) else "shards"
        return f"ShardPairs({len(self.shards)} {kind}, first {str(self.shards[0])!r})"


def sample_captions(sample: dict[str, Any], fields: Fields = DEFAULT_FIELDS) -> list[str]:
    """The usable captions of a raw shard sample, where ``fields`` says (see fields.py);
    :class:`BadSample` when there is none."""
    where = f"sample {sample['__key__']!r} of {sample.get('__url__', '?')}"
    if "__bad__" in sample:
        raise BadSample(*sample["__bad__"])
    if _from_parquet(sample):
        return clean_captions(parquet_samples.captions(sample, fields, where), where)
    meta = _metadata(sample)
    if fields.caption is not None:
        return clean_captions(_named_captions(sample, meta, fields.caption, where), where)
    listed = meta.get("captions")
    if isinstance(listed, list) and listed:
        return clean_captions(listed, where)
    member = next((m for m in CAPTION_MEMBERS if m in sample), None)
    if member is not None:
        return clean_captions([caption_text(sample[member], where)], where)
    if isinstance(meta.get("caption"), str):
        return clean_captions([meta["caption"]], where)
    raise BadSample(
        "no_caption",
        f"{where}: no .txt or .caption member, and no .json with a 'captions' list or a "
        "'caption' (name another with data.caption_key)",
    )


def _metadata(sample: dict[str, Any]) -> dict:
    """The sample's ``.json`` member as a dict ({} when absent or unreadable: the other
    members may still serve)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _named_captions(sample: dict[str, Any], meta: dict, name: str, where: str) -> list:
    """``data.caption_key``'s captions: a member of that extension, else a field of the
    ``.json`` (a string or a list)."""
    if name.lower() in sample:
        return [caption_text(sample[name.lower()], where)]
    value = meta.get(name)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise BadSample(
        "no_caption", f"{where}: no .{name} member and no {name!r} in its .json (data.caption_key)"
    )


def _from_parquet(sample: dict[str, Any]) -> bool:
    url = sample.get("__url__")  # a tar member named KEY.__url__ would make it bytes
    return isinstance(url, str) and is_parquet(url)


def decode_sample(sample: dict[str, Any], fields: Fields = DEFAULT_FIELDS) -> Pair:
    """A raw shard sample as a Pair, or :class:`BadSample` saying why it cannot be used."""
    key, url = sample["__key__"], sample.get("__url__", "?")
    where = f"sample {key!r} of {url}"
    if not is_utf8(key):
        raise BadSample("malformed_row", f"{where}: the key is not UTF-8")
    captions = sample_captions(sample, fields)  # before the image: far cheaper to check
    if _from_parquet(sample):
        data = parquet_samples.image_data(sample, fields, where)
    else:
        members = fields.image_members
        data = next((sample[ext] for ext in members if ext in sample), None)
        if data is None:
            raise BadSample("no_image", f"{where}: no .{'/.'.join(members)} member")
    row = sample.get("__row__", -1)
    return Pair(key, load_image(data, where), captions, shard_sample_id(sample), row)


def shard_samples(
    shards: Iterable[str | Path],
    first_rows: Iterable[int] | None = None,
    fields: Fields | None = None,
    *,
    images: bool = True,
) -> Iterator[dict[str, Any]]:
    """Raw samples of shards, one after the other (see ``tar_samples.read_samples`` and
    ``parquet_samples.read_samples``); with each shard's first row in its dataset, every
    sample carries its row as ``__row__``. With the ``fields`` they will be decoded with, a
    parquet file is read for those columns only (``images=False``: its captions only); a
    tar is read whole either way."""
    columns = None if fields is None else parquet_samples.wanted_columns(fields, images)
    firsts = iter(first_rows) if first_rows is not None else None
    for shard in shards:
        first = next(firsts) if firsts is not None else None
        if is_parquet(shard):
            samples = parquet_samples.read_samples(shard, columns)
        else:
            samples = read_samples(shard)
        for position, sample in enumerate(samples):
            if first is not None:
                sample["__row__"] = first + position
            yield sample
