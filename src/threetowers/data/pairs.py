"""Image-caption pairs: CSV/TSV/JSONL tables and webdataset shards, and a resumable loader.

Sources
    * :class:`PairTable` (map-style) reads a CSV/TSV with a header (``image`` and ``caption``
      columns by default, optional ``key``) or a JSONL file (``image`` plus ``caption`` or a
      ``captions`` list, optional ``key``). Image paths are relative to the table's folder.
    * :class:`ShardPairs` (streaming) reads local webdataset ``.tar`` shards as written by
      img2dataset: ``KEY.jpg|jpeg|png|webp`` and ``KEY.txt``, optionally ``KEY.json``; a
      ``"captions"`` list in the JSON, when present, replaces the ``.txt`` caption.

The resumable, rank- and worker-split loader over these sources is in ``data/loader.py``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from threetowers.data.transforms import to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
# Distinct streams for the separate uses of (seed, epoch): the sample order, the shard
# order, shuffle buffers and per-sample draws must not share random numbers.
_ORDER, _SHARDS, BUFFER_STREAM, _SAMPLE = 101, 102, 103, 104
# The same metadata rule as webdataset's tar reader, so header counts match its stream.
_META = re.compile(r"__[^/]*__($|/)")


@dataclass
class Pair:
    """One image with its captions. The loader hands ``example`` a Pair with exactly one
    caption, the one picked for this visit (see :attr:`caption`)."""

    key: str
    image: Image.Image
    captions: list[str]

    @property
    def caption(self) -> str:
        return self.captions[0]


def _load_image(data: str | Path | bytes, where: str) -> Image.Image:
    try:
        stream = io.BytesIO(data) if isinstance(data, bytes) else data
        with Image.open(stream) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {data} ({where})") from None
    except Exception as error:
        raise ValueError(f"cannot decode image of {where}: {error}") from error


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
    """Map-style pairs from a CSV/TSV/JSONL file; ``table[i]`` decodes image ``i``."""

    def __init__(
        self, images: Sequence[Path], captions: Sequence[list[str]], keys: Sequence[str], name: str
    ) -> None:
        if not len(images) == len(captions) == len(keys):
            raise ValueError("images, captions and keys must have the same length")
        duplicates = [key for key, n in Counter(keys).items() if n > 1]
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
    ) -> PairTable:
        """CSV (or TSV: ``.tsv`` suffix or ``delimiter="\\t"``) with a header row."""
        path = _existing(path)
        delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
        images, captions, keys = [], [], []
        # TSV dumps of web captions (e.g. CC3M) carry bare quote characters; only CSV quotes.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
            columns = reader.fieldnames or []
            for column in (image_column, caption_column):
                if column not in columns:
                    raise ValueError(
                        f"{path}: no column {column!r}; the header has {columns} (choose "
                        "columns with image_column= / caption_column=)"
                    )
            for row in reader:
                line = reader.line_num
                image, caption = row.get(image_column), row.get(caption_column)
                if not image:
                    raise ValueError(f"{path}:{line}: empty {image_column!r} cell")
                images.append(_resolve(path, image))
                captions.append([caption or ""])
                keys.append(row[key_column] if row.get(key_column) else f"{len(keys):09d}")
        return cls(images, captions, keys, str(path))

    @classmethod
    def from_jsonl(cls, path: str | Path) -> PairTable:
        """One JSON object per line: ``image`` and ``caption`` or ``captions`` (a list)."""
        path = _existing(path)
        images, captions, keys = [], [], []
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not valid JSON: {error}") from None
                if not isinstance(record, dict) or not record.get("image"):
                    raise ValueError(f"{where}: each line needs an object with an 'image' field")
                texts = record.get("captions", record.get("caption"))
                texts = [texts] if isinstance(texts, str) else texts
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise ValueError(
                        f"{where}: needs 'caption' (a string) or 'captions' (non-empty list)"
                    )
                images.append(_resolve(path, record["image"]))
                captions.append(list(texts))
                keys.append(str(record["key"]) if "key" in record else f"{len(keys):09d}")
        return cls(images, captions, keys, str(path))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Pair:
        where = f"{self.name} key {self.keys[index]}"
        return Pair(self.keys[index], _load_image(self.images[index], where), self.captions[index])

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's permutation of row indices, a function of (seed, epoch) only."""
        check_seed(seed, epoch)
        return np.random.default_rng([seed, epoch, _ORDER]).permutation(len(self))

    def __repr__(self) -> str:
        return f"PairTable({self.name!r}, {len(self)} pairs)"


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    return path


def _resolve(table: Path, image: str) -> Path:
    image_path = Path(image)
    return image_path if image_path.is_absolute() else table.parent / image_path


# --------------------------------------------------------------------------- shards

_COUNT_CACHE: dict[tuple[str, int, int], int] = {}


def count_shard_samples(path: str | Path) -> int:
    """Samples (keys with an image member) in one tar, from its headers alone; cached per
    (path, size, mtime). Grouping mirrors webdataset's: consecutive members sharing a key."""
    path = Path(path)
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key in _COUNT_CACHE:
        return _COUNT_CACHE[cache_key]
    count, current, has_image = 0, None, False
    try:
        # Uncompressed tars seek past member data, so only the headers are read.
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                name = member.name
                if not member.isreg() or _META.match(name):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                if prefix != current:
                    count += has_image
                    current, has_image = prefix, False
                has_image = has_image or suffix.lower() in IMAGE_EXTENSIONS
    except tarfile.TarError as error:
        raise ValueError(f"{path} is not a readable tar shard: {error}") from error
    count += has_image
    _COUNT_CACHE[cache_key] = count
    return count


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
        self.shards = shards

    @cached_property
    def sizes(self) -> list[int]:
        """Samples per shard (reads tar headers once)."""
        return [count_shard_samples(shard) for shard in self.shards]

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
    """The captions of a raw shard sample: the ``.json`` "captions" list, else the ``.txt``."""
    where = f"sample {sample['__key__']!r} of {sample.get('__url__', '?')}"
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: bad .json: {error}") from None
        listed = meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(listed, list) and listed:
            return [str(c) for c in listed]
    if "txt" not in sample:
        raise ValueError(f"{where}: no caption (.txt, or .json with a 'captions' list)")
    return [sample["txt"].decode("utf-8").strip()]


def decode_sample(sample: dict[str, Any]) -> Pair:
    key, url = sample["__key__"], sample.get("__url__", "?")
    data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    return Pair(key, _load_image(data, f"sample {key!r} of {url}"), sample_captions(sample))


def iter_pairs(source: PairSource) -> Iterator[Pair]:
    """Every pair of a dataset in file order, decoded, with all its captions."""
    pairs = open_pairs(source)
    if isinstance(pairs, PairTable):
        yield from (pairs[i] for i in range(len(pairs)))
        return
    stream = wds.WebDataset([str(s) for s in pairs.shards], shardshuffle=False, empty_check=False)
    for sample in stream:
        if any(ext in sample for ext in IMAGE_EXTENSIONS):  # as count_shard_samples counts
            yield decode_sample(sample)


def iter_captions(source: PairSource) -> Iterator[str]:
    """Every caption of a dataset, without decoding an image (to train a tokenizer)."""
    pairs = open_pairs(source)
    if isinstance(pairs, PairTable):
        yield from itertools.chain.from_iterable(pairs.captions)
        return
    stream = wds.WebDataset([str(s) for s in pairs.shards], shardshuffle=False, empty_check=False)
    for sample in stream:
        yield from sample_captions(sample)


# --------------------------------------------------------------------------- opening


PairSource = PairTable | ShardPairs | str | Path | Sequence[str | Path]


def open_pairs(
    source: PairSource,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str = "key",
) -> PairTable | ShardPairs:
    """Open ``source``: a ``.csv``/``.tsv``/``.jsonl`` table, a directory of ``*.tar``
    shards, a shard path or brace pattern (``train-{000000..000009}.tar``), or a list of
    shard paths. Already opened sources are returned as they are."""
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
        return PairTable.from_csv(path, image_column, caption_column, key_column)
    if suffix == ".jsonl":
        return PairTable.from_jsonl(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs source not found: {path}")
    raise ValueError(
        f"unknown pairs format {path.name!r}: expected .csv, .tsv, .jsonl, .tar, a brace "
        "pattern of .tar shards, or a directory of .tar shards"
    )


def epoch_size(source: PairSource) -> int:
    """Number of pairs in one epoch over all ranks (shards: counted from tar headers)."""
    return len(open_pairs(source))
