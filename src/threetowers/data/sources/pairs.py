"""Image-caption pairs: CSV/TSV/JSONL tables and webdataset shards, and a resumable loader.

Sources
    * :class:`PairTable` (map-style) reads a CSV/TSV with a header (``image`` and ``caption``
      columns by default, optional ``key``) or a JSONL file (``image`` plus ``caption`` or a
      ``captions`` list, optional ``key``). Image paths are relative to the table's folder.
    * :class:`ShardPairs` (streaming) reads local webdataset ``.tar`` shards as written by
      img2dataset: ``KEY.jpg|jpeg|png|webp`` and ``KEY.txt``, optionally ``KEY.json``; a
      ``"captions"`` list in the JSON, when present, replaces the ``.txt`` caption.

Samples that cannot be used (see ``data/bad_samples.py``) raise :class:`BadSample` where they
are decoded; the loader skips and counts them.

The resumable, rank- and worker-split loader over these sources is in ``data/loader.py``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from threetowers.data.sources.bad_samples import BadSample, Skipped
from threetowers.data.sources.decode import caption_text, clean_captions, is_utf8, load_image
from threetowers.data.sources.tar_samples import count_samples, read_samples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
# Distinct streams for the separate uses of (seed, epoch): the sample order, the shard
# order, shuffle buffers and per-sample draws must not share random numbers.
_ORDER, _SHARDS, BUFFER_STREAM, _SAMPLE = 101, 102, 103, 104


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


def shard_sample_id(sample: dict[str, Any]) -> str:
    """The id of a raw shard sample: its shard's path as the source lists it, then its key."""
    return f"{sample.get('__url__', '?')}/{sample['__key__']}"


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def check_seed(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The rng of one visit of ``key`` (caption choice, then augmentation); independent of
    order and worker. One generator, not spawned children: spawning costs 4x as much, and the
    loader makes one per sample."""
    return np.random.default_rng([seed, epoch, _SAMPLE, _key_hash(key)])


# --------------------------------------------------------------------------- tables


class PairTable:
    """Map-style pairs from a CSV/TSV/JSONL file; ``table[i]`` decodes image ``i``.

    Rows that cannot be used (malformed, a duplicate key, a path leaving the table's folder)
    stay in the table as bad rows: ``table[i]`` raises their :class:`BadSample`, so the loader
    skips and counts them like any other bad sample, and row numbers keep their meaning.
    """

    def __init__(
        self,
        images: Sequence[Path],
        captions: Sequence[list[str]],
        keys: Sequence[str],
        name: str,
        bad: dict[int, BadSample] | None = None,
    ) -> None:
        if not len(images) == len(captions) == len(keys):
            raise ValueError("images, captions and keys must have the same length")
        self.bad = dict(bad or {})
        good_keys = [key for i, key in enumerate(keys) if i not in self.bad]
        duplicates = [key for key, n in Counter(good_keys).items() if n > 1]
        if duplicates:
            raise ValueError(f"{name}: duplicate keys, e.g. {duplicates[:3]}")
        self.images = [Path(p) for p in images]
        self.captions = [list(c) for c in captions]
        self.keys = [str(k) for k in keys]
        self.name = name

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        image_column: str = "image",
        caption_column: str = "caption",
        key_column: str = "key",
        delimiter: str | None = None,
        allow_absolute_paths: bool = False,
    ) -> PairTable:
        """CSV (or TSV: ``.tsv`` suffix or ``delimiter="\\t"``) with a header row."""
        path = _existing(path)
        delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
        rows = _Rows(path, allow_absolute_paths)
        # TSV dumps of web captions (e.g. CC3M) carry bare quote characters; only CSV quotes.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        # Bytes that are not UTF-8 become lone surrogates: only their row is bad, not the file.
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
            columns = reader.fieldnames or []
            for column in (image_column, caption_column):
                if column not in columns:
                    raise ValueError(
                        f"{path}: no column {column!r}; the header has {columns} (choose "
                        "columns with image_column= / caption_column=)"
                    )
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:  # e.g. a field over the csv module's size limit
                    rows.reject(reader.line_num, None, f"unreadable row ({error})")
                    continue
                line, key = reader.line_num, row.get(key_column) or None
                if None in row or None in row.values():
                    rows.reject(line, key, f"not the {len(columns)} fields of the header")
                elif not row[image_column]:
                    rows.reject(line, key, f"empty {image_column!r} cell")
                else:
                    rows.add(line, row[image_column], [row[caption_column]], key)
        return rows.table()

    @classmethod
    def from_jsonl(cls, path: str | Path, allow_absolute_paths: bool = False) -> PairTable:
        """One JSON object per line: ``image`` and ``caption`` or ``captions`` (a list)."""
        path = _existing(path)
        rows = _Rows(path, allow_absolute_paths)
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                line = raw.decode("utf-8", errors="surrogateescape")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    rows.reject(line_number, None, f"not valid JSON: {error}")
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    rows.reject(line_number, None, "not an object with an 'image' string")
                    continue
                key = str(record["key"]) if "key" in record else None
                texts = record.get("captions", record.get("caption"))
                texts = [texts] if isinstance(texts, str) else texts
                if not isinstance(texts, list):
                    rows.reject(line_number, key, "needs 'caption' (a string) or 'captions'")
                    continue
                rows.add(line_number, record["image"], texts, key)
        return rows.table()

    @property
    def ids(self) -> list[str]:
        """Each row's sample id (see :class:`Pair`): the keys, unique within a table."""
        return self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Pair:
        if index in self.bad:
            raise self.bad[index]
        where = f"{self.name} key {self.keys[index]}"
        captions = clean_captions(self.captions[index], where)
        image = load_image(self.images[index], where)
        return Pair(self.keys[index], image, captions, self.keys[index], index)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's permutation of row indices, a function of (seed, epoch) only."""
        check_seed(seed, epoch)
        return np.random.default_rng([seed, epoch, _ORDER]).permutation(len(self))

    def __repr__(self) -> str:
        return f"PairTable({self.name!r}, {len(self)} pairs)"


class _Rows:
    """A table's rows as they are read: each with a key, good or bad (see PairTable)."""

    def __init__(self, table: Path, allow_absolute_paths: bool) -> None:
        self.table_path, self.allow_absolute_paths = table, allow_absolute_paths
        self.images: list[Path] = []
        self.captions: list[list[str]] = []
        self.keys: list[str] = []
        self.bad: dict[int, BadSample] = {}
        self.first_line: dict[str, int] = {}

    def add(self, line: int, image: str, captions: list, key: str | None) -> None:
        where = f"{self.table_path}:{line}"
        if key is not None and key in self.first_line:
            self.reject(line, key, f"duplicate key {key!r} (first on line {self.first_line[key]})")
            return
        try:
            if key is not None and not is_utf8(key):
                raise BadSample("malformed_row", f"{where}: key {key!r} is not UTF-8")
            path = _resolve(self.table_path, image, self.allow_absolute_paths, where)
        except BadSample as bad:
            self._append(Path(), [], key, bad)
            return
        key = self._append(path, list(captions), key, None)
        self.first_line[key] = line

    def reject(self, line: int, key: str | None, problem: str) -> None:
        bad = BadSample("malformed_row", f"{self.table_path}:{line}: {problem}")
        self._append(Path(), [], key, bad)

    def _append(self, image: Path, captions: list, key: str | None, bad: BadSample | None) -> str:
        # Rows without a key are named by their position, bad rows included.
        key = key if key is not None else f"{len(self.keys):09d}"
        if bad is not None:
            self.bad[len(self.keys)] = bad
        self.images.append(image)
        self.captions.append(captions)
        self.keys.append(key)
        return key

    def table(self) -> PairTable:
        return PairTable(self.images, self.captions, self.keys, str(self.table_path), self.bad)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    return path


def _resolve(table: Path, image: str, allow_absolute_paths: bool, where: str) -> Path:
    """An image path of a table, relative to the table's folder.

    Absolute paths and paths that climb out with ``..`` are refused unless allowed, so that a
    data file cannot make the loader read elsewhere. The check is lexical: symbolic links
    inside the folder are the folder owner's choice and are followed.
    """
    if not is_utf8(image):
        raise BadSample("malformed_row", f"{where}: image path {image!r} is not UTF-8")
    path = Path(image)
    inside = not path.is_absolute() and Path(os.path.normpath(image)).parts[:1] != (os.pardir,)
    if not (inside or allow_absolute_paths):
        raise BadSample(
            "path_outside_root",
            f"{where}: image path {image!r} leaves the table's folder {table.parent}",
        )
    return path if path.is_absolute() else table.parent / path


# --------------------------------------------------------------------------- shards

_COUNT_CACHE: dict[tuple[str, int, int], int] = {}


def count_shard_samples(path: str | Path) -> int:
    """Samples in one tar from its headers alone (see ``tar_samples``), cached per
    (path, size, mtime). Every key is a sample, with or without an image: those without
    are streamed, then skipped and counted as bad."""
    path = Path(path)
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _COUNT_CACHE:
        _COUNT_CACHE[cache_key] = count_samples(path)
    return _COUNT_CACHE[cache_key]


class ShardPairs:
    """Local webdataset shards, in the order given (shuffled per epoch by the loader)."""

    def __init__(self, shards: Sequence[str | Path]) -> None:
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
        self.shards = shards

    @cached_property
    def sizes(self) -> list[int]:
        """Samples per shard (reads tar headers once)."""
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
        state = np.random.SeedSequence([seed, epoch, _SHARDS]).generate_state(2, np.uint64)
        urls = [str(i) for i in range(len(self.shards))]
        # webdataset's own seeded shard shuffle, run here so every rank can plan the epoch.
        shuffled = wds.SimpleShardList(urls, seed=int(state[0]) << 64 | int(state[1]))
        return [int(entry["url"]) for entry in shuffled]

    def __repr__(self) -> str:
        return f"ShardPairs({len(self.shards)} shards, first {str(self.shards[0])!r})"


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """The usable captions of a raw shard sample: the ``.json`` "captions" list when it has
    one, else the ``.txt``; :class:`BadSample` when there is none."""
    where = f"sample {sample['__key__']!r} of {sample.get('__url__', '?')}"
    if "__bad__" in sample:
        raise BadSample(*sample["__bad__"])
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:  # unreadable metadata: the .txt caption still serves
            meta = None
        listed = meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(listed, list) and listed:
            return clean_captions(listed, where)
    if "txt" not in sample:
        raise BadSample("no_caption", f"{where}: no .txt, and no .json with a 'captions' list")
    return clean_captions([caption_text(sample["txt"], where)], where)


def decode_sample(sample: dict[str, Any]) -> Pair:
    """A raw shard sample as a Pair, or :class:`BadSample` saying why it cannot be used."""
    key, url = sample["__key__"], sample.get("__url__", "?")
    where = f"sample {key!r} of {url}"
    if not is_utf8(key):
        raise BadSample("malformed_row", f"{where}: the key is not UTF-8")
    captions = sample_captions(sample)  # before the image: far cheaper to check
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise BadSample("no_image", f"{where}: no .{'/.'.join(IMAGE_EXTENSIONS)} member")
    row = sample.get("__row__", -1)
    return Pair(key, load_image(data, where), captions, shard_sample_id(sample), row)


def shard_samples(
    shards: Iterable[str | Path], first_rows: Iterable[int] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples of shards, one after the other (see ``tar_samples.read_samples``); with
    each shard's first row in its dataset, every sample carries its row as ``__row__``."""
    firsts = iter(first_rows) if first_rows is not None else None
    for shard in shards:
        first = next(firsts) if firsts is not None else None
        for position, sample in enumerate(read_samples(shard)):
            if first is not None:
                sample["__row__"] = first + position
            yield sample


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
            item = decode_sample(sample)
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
            yield from sample_captions(sample)


# --------------------------------------------------------------------------- opening


PairSource = PairTable | ShardPairs | str | Path | Sequence[str | Path]


def open_pairs(
    source: PairSource,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str = "key",
    allow_absolute_paths: bool = False,
) -> PairTable | ShardPairs:
    """Open ``source``: a ``.csv``/``.tsv``/``.jsonl`` table, a directory of ``*.tar``
    shards, a shard path or brace pattern (``train-{000000..000009}.tar``), or a list of
    shard paths. Already opened sources are returned as they are. A table's image paths
    must stay inside its folder unless ``allow_absolute_paths``."""
    if isinstance(source, (PairTable, ShardPairs)):
        return source
    if isinstance(source, (list, tuple)):
        not_tar = [str(s) for s in source if not str(s).endswith(".tar")]
        if not_tar:
            raise ValueError(f"a list source must hold .tar shards; got {not_tar[:3]}")
        return ShardPairs(source)
    path = Path(source)
    text = str(source)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no *.tar shards in directory {path}")
        return ShardPairs(shards)
    if "{" in text:
        return ShardPairs(wds.shardlists.expand_urls(text))
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return ShardPairs([path])
    if suffix in (".csv", ".tsv"):
        return PairTable.from_csv(
            path,
            image_column,
            caption_column,
            key_column,
            allow_absolute_paths=allow_absolute_paths,
        )
    if suffix == ".jsonl":
        return PairTable.from_jsonl(path, allow_absolute_paths=allow_absolute_paths)
    if not path.exists():
        raise FileNotFoundError(f"pairs source not found: {path}")
    raise ValueError(
        f"unknown pairs format {path.name!r}: expected .csv, .tsv, .jsonl, .tar, a brace "
        "pattern of .tar shards, or a directory of .tar shards"
    )


def epoch_size(source: PairSource) -> int:
    """Number of pairs in one epoch over all ranks (shards: counted from tar headers)."""
    return len(open_pairs(source))
