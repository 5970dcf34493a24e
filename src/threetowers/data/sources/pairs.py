"""Opening a dataset of image-caption pairs, whatever its form, and reading it through once.

Sources
    * :class:`~threetowers.data.sources.table.PairTable` (map-style): a CSV/TSV/JSONL table.
    * :class:`~threetowers.data.sources.shards.ShardPairs` (streaming): local webdataset
      ``.tar`` shards, or ``.parquet`` files (each file a shard: ``parquet_samples.py``);
      remote ``.tar`` shards (``remote.py``): ``http(s)://`` URLs, ``pipe:COMMAND``,
      fsspec URLs (``s3://``, ``gs://``, ...), streamed.

Samples that cannot be used (see ``bad_samples.py``) raise :class:`BadSample` where they
are decoded; the loader skips and counts them. The resumable, rank- and worker-split loader
over these sources is in ``loader.py``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import webdataset as wds

from threetowers.data.sources import remote
from threetowers.data.sources.bad_samples import BadSample, Skipped, SourceError
from threetowers.data.sources.decode import clean_captions
from threetowers.data.sources.fields import DEFAULT_FIELDS, Fields
from threetowers.data.sources.pair import Pair
from threetowers.data.sources.shards import (
    ShardPairs,
    decode_sample,
    is_parquet,
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
    for sample in shard_samples(pairs.shards, pairs.first_rows, pairs.fields):
        try:
            item = decode_sample(sample, pairs.fields)
        except BadSample as bad:
            item = bad.skipped(shard_sample_id(sample))
        yield item


def iter_captions(source: PairSource) -> Iterator[str]:
    """Every usable caption of a dataset, without decoding an image (to train a tokenizer).
    Bad samples are passed over silently here: the passes that use them count them."""
    for _, captions in iter_sample_captions(source):
        yield from captions


def iter_sample_captions(
    source: PairSource, parts: Iterable[int] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """(sample id, its usable captions) of each usable sample, images unread (a shard's
    caption members only: ``shards.caption_members``). ``parts``: the positions of the
    shards (of a table: the rows) to read, in that order; None: all, in file order."""
    pairs = open_pairs(source)
    if isinstance(pairs, PairTable):
        for index in range(len(pairs)) if parts is None else parts:
            if index not in pairs.bad:
                with contextlib.suppress(BadSample):
                    yield pairs.ids[index], clean_captions(pairs.captions[index], pairs.name)
        return
    shards = pairs.shards if parts is None else [pairs.shards[index] for index in parts]
    for sample in shard_samples(shards, fields=pairs.fields, images=False):
        with contextlib.suppress(BadSample):
            yield shard_sample_id(sample), sample_captions(sample, pairs.fields)


def open_pairs(
    source: PairSource,
    *,
    fields: Fields = DEFAULT_FIELDS,
    allow_absolute_paths: bool = False,
    shard_index: str | Path | None = None,
) -> PairTable | ShardPairs:
    """Open ``source``: a ``.csv``/``.tsv``/``.jsonl`` table; webdataset ``.tar`` shards or
    ``.parquet`` files as a directory of them, one path, a brace pattern
    (``train-{000000..000009}.tar``) or a list of paths; remote ``.tar`` shards as one URL
    or ``pipe:COMMAND``, a brace pattern of them (``https://host/d/{00000..00009}.tar``)
    or a list (see ``remote.py``). ``fields`` says where each sample's image and captions
    are. Already opened sources are returned as they are. A table's or parquet file's image
    paths must stay inside its folder unless ``allow_absolute_paths``. With ``shard_index``
    (``data.cache_dir``), shards are counted as they are opened, local tars through the
    shard index there (``shard_index.py``), so that the process that opens a dataset first
    (under torchrun rank 0, in ``distributed.main_first``) scans it for all others."""
    if isinstance(source, (PairTable, ShardPairs)):
        return source
    if isinstance(source, (list, tuple)):
        unknown = [str(s) for s in source if not _names_shard(s)]
        if unknown:
            raise SourceError(
                f"a list source must hold .tar shards or .parquet files; got {unknown[:3]}"
            )
        return _shards(source, fields, allow_absolute_paths, shard_index)
    if remote.is_remote(source):
        urls = wds.shardlists.expand_urls(source) if "{" in source else [source]
        unknown = [url for url in urls if not remote.names_tar(url)]
        if unknown:
            raise SourceError(
                f"a remote source must name .tar shards: one URL, a quoted brace pattern "
                f"('https://host/data/{{00000..00009}}.tar') or a list (a remote folder cannot "
                f"be listed; tables and parquet files are read by seeking: download them "
                f"first); got {unknown[:3]}"
            )
        return _shards(urls, fields, allow_absolute_paths, shard_index)
    path = Path(source)
    text = str(source)
    if path.is_dir():
        return _shards(_folder(path), fields, allow_absolute_paths, shard_index)
    if "{" in text:
        return _shards(wds.shardlists.expand_urls(text), fields, allow_absolute_paths, shard_index)
    suffix = path.suffix.lower()
    if suffix in (".tar", ".parquet"):
        return _shards([path], fields, allow_absolute_paths, shard_index)
    if suffix in (".csv", ".tsv"):
        return PairTable.from_csv(path, fields, allow_absolute_paths=allow_absolute_paths)
    if suffix == ".jsonl":
        return PairTable.from_jsonl(path, fields, allow_absolute_paths=allow_absolute_paths)
    if not path.exists():
        raise FileNotFoundError(f"pairs source not found: {path}")
    raise SourceError(
        f"unknown pairs format {path.name!r}: expected .csv, .tsv, .jsonl, .tar or .parquet, a "
        "brace pattern of .tar shards or .parquet files, or a directory of them"
    )


def _names_shard(shard) -> bool:
    """Whether a list item names a shard: a local ``.tar`` or ``.parquet`` file, a remote
    tar (any ``pipe:`` command) or parquet file (refused by ShardPairs with the reason)."""
    if remote.is_remote(shard):
        return remote.names_tar(shard) or is_parquet(remote.tar_name(shard))
    return str(shard).endswith(".tar") or is_parquet(shard)


def _shards(
    paths: Sequence, fields: Fields, allow_absolute_paths: bool, shard_index: str | Path | None
) -> ShardPairs:
    """Shards as ShardPairs; parquet files carry the path rule in their fields, since their
    samples' paths resolve where they are decoded (fields.py)."""
    if any(is_parquet(path) for path in paths):
        fields = replace(fields, allow_absolute_paths=allow_absolute_paths)
    pairs = ShardPairs(paths, fields, shard_index=shard_index)
    if shard_index is not None:
        len(pairs)  # counted now, while this process is the first (see open_pairs)
    return pairs


# Hugging Face's shard names: SPLIT-00000-of-00004.parquet
_SPLIT_FILE = re.compile(r"(.+)-(\d+)-of-(\d+)\.parquet")


def _folder(path: Path) -> list[Path]:
    """The shards of a directory: its ``*.tar`` or its ``*.parquet`` files, never both,
    and never the parquet files of several Hugging Face splits (``train-*``, ``test-*``:
    one would leak into the other)."""
    tars, parquets = sorted(path.glob("*.tar")), sorted(path.glob("*.parquet"))
    if tars and parquets:
        raise SourceError(
            f"directory {path} holds both .tar shards and .parquet files, and a source is "
            "one kind: name the files of one with a quoted brace pattern"
        )
    if not tars and not parquets:
        nested = path / "data"
        hint = f" (its data/ folder has some: {nested})" if any(nested.glob("*.parquet")) else ""
        raise FileNotFoundError(f"no *.tar shards or *.parquet files in directory {path}{hint}")
    splits: dict[str, list[re.Match]] = {}
    for file in parquets:
        if match := _SPLIT_FILE.fullmatch(file.name):
            splits.setdefault(match.group(1), []).append(match)
    if len(splits) > 1:
        name = "train" if "train" in splits else min(splits)
        numbers = sorted(match.group(2) for match in splits[name])
        total = splits[name][0].group(3)
        pattern = path / f"{name}-{{{numbers[0]}..{numbers[-1]}}}-of-{total}.parquet"
        raise SourceError(
            f"directory {path} holds the parquet files of several splits "
            f"({', '.join(sorted(splits))}); name one split's files with a quoted brace "
            f"pattern, e.g. '{pattern}'"
        )
    return tars or parquets


def epoch_size(source: PairSource) -> int:
    """Number of pairs in one epoch over all ranks (shards: counted from tar headers or
    parquet footers)."""
    return len(open_pairs(source))
