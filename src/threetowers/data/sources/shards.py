"""Streaming pairs from local webdataset ``.tar`` shards as img2dataset writes them:
``KEY.jpg`` (or another image member) and ``KEY.txt``, optionally ``KEY.json``, whose
``"captions"`` list, when present, replaces the ``.txt`` caption; ``data.image_key`` and
``data.caption_key`` name other members or ``.json`` fields (fields.py). Members are read
only within their size limits (1 MiB of text or metadata, 64 MiB of image: see
``tar_samples``).

A local tar's count comes from its headers, scanned once per process, or with
``data.cache_dir`` once per shard: ``shard_index`` keeps the counts there for every process.

A ``.parquet`` file is a shard too (``parquet_samples``: its rows are its samples): it is
counted, streamed and decoded here by its suffix, so everything built on shards (the
loader's plans and resume, the feature caches' units, bad-sample names) serves both. One
source holds one kind.

A tar shard may be remote (``remote.py``): a ``str`` that is an ``http(s)://`` or fsspec URL
or a ``pipe:COMMAND``, kept as spelled (its samples' ids are ``URL/KEY``), streamed rather
than read from a file. Its count, which the loader plans an epoch on, comes from
img2dataset's ``_stats.json`` beside it, else from the count cache, else from streaming it
once (then kept in the cache, ``remote_counts.count_cache_dir``, when the transfer ended well); a
shard that cannot be read after the transport's retries counts, and streams, as one bad
sample (``unreachable_shard``). So that a plan and its stream agree even when a server
changes its mind between them, a remote shard streams exactly the samples it was planned
with (:func:`shard_samples`): samples missing at the end stream as bad (``truncated_shard``,
each named), a shard unreachable when counted stays one bad sample without being read
again, and one that now holds more samples than counted ends at its count (its last
planned sample bad, naming the sample where the rest begin)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from threetowers.data.sources import (
    parquet_samples,
    remote,
    remote_counts,
    remote_identity,
    shard_index,
)
from threetowers.data.sources.bad_samples import BadSample, SourceError
from threetowers.data.sources.decode import (
    EncodedImage,
    caption_text,
    clean_captions,
    is_utf8,
    load_image,
)
from threetowers.data.sources.fields import CAPTION_MEMBERS, DEFAULT_FIELDS, Fields
from threetowers.data.sources.pair import SHARD_STREAM, Pair, check_seed
from threetowers.data.sources.parquet_samples import is_parquet
from threetowers.data.sources.tar_samples import (
    count_file,
    count_samples,
    count_stream,
    read_samples,
)

log = logging.getLogger(__name__)


def shard_sample_id(sample: dict[str, Any]) -> str:
    """The id of a raw shard sample: its shard's path as the source lists it, then its key."""
    return f"{sample.get('__url__', '?')}/{sample['__key__']}"


_COUNT_CACHE: dict[shard_index.ShardKey, int] = {}  # this process's counts of local shards
_REMOTE_COUNTS: dict[str, int] = {}  # a remote shard's identity (JSON) -> its count


@dataclass(frozen=True)
class _Plan:
    """What a remote shard was counted as, for :func:`shard_samples` to stream exactly that:
    ``source`` of the count; ``failure`` when a broken transfer decided it; ``unreachable``
    when nothing arrived."""

    samples: int
    source: str
    failure: str | None = None
    unreachable: bool = False


# The latest count of each remote shard in this process (loader workers fork with it).
_PLANNED: dict[str, _Plan] = {}


def count_shard_samples(path: str | Path, count_cache: str | Path | None = None) -> int:
    """Samples in one tar from its headers alone (see ``tar_samples``), or in one parquet
    file from its footer, cached per (path, size, mtime). Every key is a sample, with or
    without an image: those without are streamed, then skipped and counted as bad. A remote
    shard (see the module docstring) is counted from its ``_stats.json`` or by streaming it,
    kept in ``count_cache`` (default: ``remote_counts.count_cache_dir()``)."""
    if remote.is_remote(path):
        return _count_remote(str(path), count_cache)
    path = Path(path)
    cache_key = shard_index.shard_key(path)
    if cache_key not in _COUNT_CACHE:
        counter = parquet_samples.count_samples if is_parquet(path) else count_samples
        _COUNT_CACHE[cache_key] = counter(path)
    return _COUNT_CACHE[cache_key]


def _count_remote(url: str, count_cache: str | Path | None) -> int:
    known = remote_identity.identity(url)
    key = None if known is None else json.dumps(known, sort_keys=True)
    plan = None
    if key is not None and key in _REMOTE_COUNTS:
        plan = _Plan(_REMOTE_COUNTS[key], "an earlier count of it")
    elif known is not None and (kept := remote_counts.load_count(known, count_cache)) is not None:
        plan = _Plan(kept, "the count cache")
    elif (stats := remote_counts.stats_count(url)) is not None:
        plan = _Plan(stats, "its _stats.json")
    if plan is None:
        counted = count_stream(url)
        plan = _Plan(counted.samples, "a read of it", counted.failure, counted.unreachable)
        if counted.failure is None and known is not None:
            remote_counts.save_count(known, counted.samples, count_cache)
    if plan.failure is None and key is not None:
        _REMOTE_COUNTS[key] = plan.samples
    _PLANNED[url] = plan
    return plan.samples


def count_all(
    shards: Sequence[str | Path],
    count_cache: str | Path | None = None,
    index: str | Path | None = None,
) -> list[int]:
    """:func:`count_shard_samples` of each shard, remote ones several at once; with an
    ``index`` folder (``data.cache_dir``), local tars are counted through its shard index
    (``shard_index``: read there, else scanned and kept there)."""
    far = [shard for shard in shards if remote.is_remote(shard)]
    counted = remote.parallel(lambda url: count_shard_samples(url, count_cache), far)
    counts: dict = dict(zip(far, counted, strict=True))
    if index is not None:
        tars = [s for s in shards if not remote.is_remote(s) and not is_parquet(s)]
        counts |= _indexed_counts(tars, index)
    return [counts[s] if s in counts else count_shard_samples(s) for s in shards]


def _indexed_counts(tars: Sequence[Path], index: str | Path) -> dict[Path, int]:
    """Local tars' counts from the shard index in ``index``; those it lacks are scanned, and
    kept there when read whole."""
    keys = {path: shard_index.shard_key(path) for path in tars}
    kept = shard_index.load(index, keys.values())
    _COUNT_CACHE.update(kept)
    scanned = {}
    for path, key in keys.items():
        if key not in kept:
            counted = count_file(path)
            _COUNT_CACHE[key] = counted.samples
            if counted.failure is None:
                scanned[key] = counted.samples
    if scanned:
        shard_index.save(index, scanned)
    return {path: _COUNT_CACHE[key] for path, key in keys.items()}


class ShardPairs:
    """Webdataset shards (local files, or remote ones: see the module docstring), or local
    parquet files, in the order given (shuffled per epoch by the loader). Parquet files are
    checked for their columns here, from their footers. ``count_cache``: where streamed
    counts of remote shards are kept (default ``remote_counts.count_cache_dir()``);
    ``shard_index``: the folder of the local tars' shard index (``data.cache_dir``; None:
    their headers are scanned, once per process)."""

    def __init__(
        self,
        shards: Sequence[str | Path],
        fields: Fields = DEFAULT_FIELDS,
        *,
        count_cache: str | Path | None = None,
        shard_index: str | Path | None = None,
    ) -> None:
        shards = [s if remote.is_remote(s) else Path(s) for s in shards]
        if not shards:
            raise SourceError("no shards given")
        far = [s for s in shards if remote.is_remote(s)]
        if any(is_parquet(remote.tar_name(s)) for s in far):
            example = next(s for s in far if is_parquet(remote.tar_name(s)))
            raise SourceError(
                f"remote parquet files cannot be streamed (a parquet file is read from its "
                f"footer, at its end): download them first ({example})"
            )
        remote.check_readable(far)
        missing = [str(s) for s in shards if not remote.is_remote(s) and not s.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(shards)} shards not found, e.g. {missing[:3]}"
            )
        repeated = [str(s) for s, n in Counter(shards).items() if n > 1]
        if repeated:  # its samples would be two samples of one id (see Pair)
            raise SourceError(f"shards listed more than once: {repeated[:3]}; list each once")
        parquet = [s for s in shards if is_parquet(s)]
        if parquet and len(parquet) < len(shards):
            other = next(s for s in shards if not is_parquet(s))
            raise SourceError(
                f"a source is either webdataset shards or parquet files, not both: "
                f"{len(parquet)} of {len(shards)} are .parquet files (e.g. {parquet[0]}) and the "
                f"others not (e.g. {other}); train on one kind"
            )
        for path in parquet:
            parquet_samples.check_columns(path, fields)
        self.shards, self.fields, self.count_cache = shards, fields, count_cache
        self.shard_index = shard_index

    @cached_property
    def sizes(self) -> list[int]:
        """Samples per shard (local tars: from the shard index, else their headers, once;
        parquet footers; remote shards: see :func:`count_shard_samples`)."""
        return count_all(self.shards, self.count_cache, self.shard_index)

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


def caption_members(fields: Fields = DEFAULT_FIELDS) -> frozenset[str]:
    """The tar members :func:`sample_captions` reads: the ``.json``, the caption members
    and ``data.caption_key``'s member."""
    named = () if fields.caption is None else (fields.caption.lower(),)
    return frozenset(("json", *CAPTION_MEMBERS, *named))


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


def decode_sample(
    sample: dict[str, Any], fields: Fields = DEFAULT_FIELDS, encoded: bool = False
) -> Pair:
    """A raw shard sample as a Pair, or :class:`BadSample` saying why it cannot be used;
    ``encoded``: its image an :class:`EncodedImage`, decoded by the transform that reads it."""
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
    image = EncodedImage(data, where) if encoded else load_image(data, where)
    return Pair(key, image, captions, shard_sample_id(sample), row)


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
    parquet file is read for those columns only, and ``images=False`` reads captions only:
    a parquet file's caption columns, a tar's :func:`caption_members` (its other members'
    data skipped unread, see ``tar_samples``; a remote tar streams past it)."""
    columns = None if fields is None else parquet_samples.wanted_columns(fields, images)
    members = None if fields is None or images else caption_members(fields)
    firsts = iter(first_rows) if first_rows is not None else None
    for shard in shards:
        first = next(firsts) if firsts is not None else None
        if is_parquet(shard):
            samples = parquet_samples.read_samples(shard, columns)
        elif remote.is_remote(shard) and shard in _PLANNED:
            samples = _as_planned(shard, _PLANNED[shard], members)
        else:
            samples = read_samples(shard, members)
        for position, sample in enumerate(samples):
            if first is not None:
                sample["__row__"] = first + position
            yield sample


def _as_planned(url: str, plan: _Plan, members: frozenset[str] | None) -> Iterator[dict[str, Any]]:
    """A remote shard's samples, exactly ``plan.samples`` of them (see the module docstring);
    ``members``: as ``read_samples`` takes them."""
    if plan.unreachable:  # not asked again: a sample that came now would not fit the plan
        detail = f"{url} could not be read when its samples were counted: {plan.failure}"
        yield _bad_sample(remote.shard_name(url), url, "unreachable_shard", detail)
        return
    samples = read_samples(url, members)
    held, streamed = None, 0
    for sample in samples:
        streamed += 1
        if streamed > plan.samples:
            samples.close()
            if held is None:  # planned empty: nothing can stand for the rest
                log.warning("%s: samples arrived where %s counted none", url, plan.source)
                return
            detail = (
                f"{url} holds more samples than the {plan.samples} counted ({plan.source}) "
                f"when the epoch was planned: the rest, from {sample['__key__']!r} on, are "
                "left out of this run (was it changed?)"
            )
            yield _bad_sample(held["__key__"], url, "truncated_shard", detail)
            return
        if held is not None:
            yield held
        held = sample
    if held is not None:
        yield held
    for position in range(streamed, plan.samples):
        detail = (
            f"{url} streamed {streamed} samples, {plan.samples} were counted ({plan.source}) "
            f"when the epoch was planned: sample {position + 1} never arrived"
        )
        yield _bad_sample(f"missing-{position + 1}", url, "truncated_shard", detail)


def _bad_sample(key: str, url: str, reason: str, detail: str) -> dict[str, Any]:
    return {"__key__": key, "__url__": url, "__bad__": (reason, detail)}
