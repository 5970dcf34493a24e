"""Image-caption pairs: CSV/TSV/JSONL tables and webdataset shards, and a resumable loader.

Sources
    * :class:`PairTable` (map-style) reads a CSV/TSV with a header (``image`` and ``caption``
      columns by default, optional ``key``) or a JSONL file (``image`` plus ``caption`` or a
      ``captions`` list, optional ``key``). Image paths are relative to the table's folder.
    * :class:`ShardPairs` (streaming) reads local webdataset ``.tar`` shards as written by
      img2dataset: ``KEY.jpg|jpeg|png|webp`` and ``KEY.txt``, optionally ``KEY.json``; a
      ``"captions"`` list in the JSON, when present, replaces the ``.txt`` caption.

Guarantees of :func:`pair_batches` (same arguments and data, deterministic ``example``:
the same batches, bit for bit):
    * Map-style: batches depend on the rows, ``seed``, ``epoch``, ``batch_size``, ``rank``,
      ``world_size``, ``drop_last`` and ``example`` only - not on ``num_workers``.
      ``start_batch=k`` slices the epoch's permutation, so resuming costs no I/O and is exact
      with any number of workers.
    * Shards: batches also depend on ``num_workers`` and ``shuffle_buffer``, because each
      DataLoader worker streams its own shards through its own shuffle buffer (of
      ``shuffle_buffer`` raw samples) and builds whole batches (a batch never mixes
      workers). ``start_batch=k`` is exact only with the same ``num_workers`` (and all else
      equal): each worker re-reads the tar bytes up to its resume point but skips decoding
      and ``example``. The DataLoader's round-robin over workers is checked against the
      plan as batches arrive, and each worker's sample count against the tar headers.
    * Within an epoch every sample of a rank's share is visited at most once, and exactly
      once unless ``drop_last`` drops some. Map-style drops ``len % world_size`` samples
      (equal shares) and one partial batch per rank; shards drop one partial batch per
      worker, so up to ``max(1, num_workers) * (batch_size - 1)`` samples per rank.
    * Ranks read disjoint samples (shards are dealt to ranks, then to workers). Map-style
      ranks get equal batch counts when ``drop_last``; shard ranks may not (shard sizes
      differ): use :func:`num_batches` and stop every rank at the minimum.
    * Each visit of a sample draws its caption (when it has several) and the ``example``
      rng from (seed, epoch, key), so augmentation and caption choice do not depend on
      order, rank or worker.
    * Not guaranteed: the same batches after the data changes, or across versions of
      numpy, webdataset or Pillow (permutations, the shuffle buffer and decoders may move).
      Shards must be local files (sample counts come from their tar headers).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from threetowers.data.transforms import to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
# Distinct streams for the separate uses of (seed, epoch): the sample order, the shard
# order, shuffle buffers and per-sample draws must not share random numbers.
_ORDER, _SHARDS, _BUFFER, _SAMPLE = 101, 102, 103, 104
# The same metadata rule as webdataset's tar reader, so header counts match its stream.
_META = re.compile(r"__[^/]*__($|/)")

Example = Callable[["Pair", np.random.Generator], dict[str, torch.Tensor]]


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


def _check_seed(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")


def sample_rngs(seed: int, epoch: int, key: str) -> tuple[np.random.Generator, np.random.Generator]:
    """(caption rng, example rng) of one visit of ``key``; independent of order and worker."""
    caption, example = np.random.SeedSequence([seed, epoch, _SAMPLE, _key_hash(key)]).spawn(2)
    return np.random.default_rng(caption), np.random.default_rng(example)


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
        _check_seed(seed, epoch)
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
        _check_seed(seed, epoch)
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


def _decode_sample(sample: dict[str, Any]) -> Pair:
    key, url = sample["__key__"], sample.get("__url__", "?")
    data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    return Pair(key, _load_image(data, f"sample {key!r} of {url}"), sample_captions(sample))


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


# --------------------------------------------------------------------------- planning


def _check_loader_args(batch_size: int, start_batch: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be non-negative, got {start_batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _batch_count(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def _table_batches(
    table: PairTable, batch_size: int, seed: int, epoch: int, rank: int, world: int, drop: bool
) -> list[list[int]]:
    order = table.order(seed, epoch)
    share = order[rank::world]
    if drop:  # equal shares, so every rank takes the same number of steps
        share = share[: len(table) // world]
    count = _batch_count(len(share), batch_size, drop)
    return [share[i * batch_size : (i + 1) * batch_size].tolist() for i in range(count)]


@dataclass(frozen=True)
class _WorkerPlan:
    shards: list[int]
    samples: int
    batches: int


def _shard_plans(
    source: ShardPairs,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    workers: int,
    drop: bool,
) -> list[_WorkerPlan]:
    streams = max(1, workers)
    if len(source.shards) < world * streams:
        raise ValueError(
            f"{len(source.shards)} shards cannot feed {world} rank(s) x {streams} loader "
            f"worker(s): every worker needs at least one shard of its own. Use fewer "
            f"num_workers (at most {max(1, len(source.shards) // world)}) or write the data "
            f"as at least {world * streams} shards"
        )
    order = source.shard_order(seed, epoch)
    plans = []
    for worker in range(streams):
        shards = _assigned(order, rank, world, worker, streams)
        samples = sum(source.sizes[i] for i in shards)
        plans.append(_WorkerPlan(shards, samples, _batch_count(samples, batch_size, drop)))
    return plans


def _assigned(order: list[int], rank: int, world: int, worker: int, workers: int) -> list[int]:
    # Same split as webdataset's split_by_node / split_by_worker, but with an explicit rank.
    return list(itertools.islice(itertools.islice(order, rank, None, world), worker, None, workers))


def _round_robin(counts: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(worker, batch index) in the order a DataLoader interleaves IterableDataset workers
    (polled cyclically from worker 0): round by round, each worker that still has batches
    contributes its next one."""
    for round_index in range(max(counts, default=0)):
        for worker, count in enumerate(counts):
            if round_index < count:
                yield worker, round_index


def _resume_point(counts: Sequence[int], start_batch: int) -> tuple[list[int], int]:
    """How many of each worker's batches fall within the first ``start_batch`` batches, and
    which worker owes the next one.

    A fresh DataLoader always polls its worker 0 first, so on resume loader worker ``i``
    runs plan worker ``(i + next) % workers``: the rotation continues the interrupted round
    and then the later rounds in plan order, exhausted workers skipped as before.
    """
    skipped = [0] * len(counts)
    schedule = _round_robin(counts)
    for worker, _ in itertools.islice(schedule, start_batch):
        skipped[worker] += 1
    upcoming = next(schedule, None)
    return skipped, upcoming[0] if upcoming is not None else 0


def num_batches(
    source: PairSource,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = True,
) -> int:
    """Batches :func:`pair_batches` yields for ``rank`` in this epoch (from ``start_batch=0``)."""
    source = open_pairs(source)
    _check_loader_args(batch_size, 0, rank, world_size)
    if isinstance(source, PairTable):
        return len(_table_batches(source, batch_size, seed, epoch, rank, world_size, drop_last))
    plans = _shard_plans(source, batch_size, seed, epoch, rank, world_size, num_workers, drop_last)
    return sum(plan.batches for plan in plans)


# --------------------------------------------------------------------------- loading


def _make_example(pair: Pair, example: Example, seed: int, epoch: int) -> tuple[str, dict]:
    caption_rng, example_rng = sample_rngs(seed, epoch, pair.key)
    caption = pair.captions[int(caption_rng.integers(len(pair.captions)))]
    fields = example(Pair(pair.key, pair.image, [caption]), example_rng)
    if not isinstance(fields, dict) or "keys" in fields:
        raise TypeError(
            "example must return a dict of tensors without a 'keys' entry (the loader adds it)"
        )
    return pair.key, fields


def _collate(items: list[tuple[str, dict]]) -> dict[str, Any]:
    names = list(items[0][1])
    batch: dict[str, Any] = {}
    for name in names:
        try:
            batch[name] = torch.stack([fields[name] for _, fields in items])
        except (KeyError, TypeError, RuntimeError) as error:
            raise ValueError(
                f"cannot batch example field {name!r}: every example must return the same "
                f"fields as tensors of one shape ({error})"
            ) from error
    batch["keys"] = [key for key, _ in items]
    return batch


def _passthrough(item: Any) -> Any:
    return item


class _TableExamples(Dataset):
    def __init__(self, table: PairTable, example: Example, seed: int, epoch: int) -> None:
        self.table, self.example, self.seed, self.epoch = table, example, seed, epoch

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[str, dict]:
        return _make_example(self.table[index], self.example, self.seed, self.epoch)


class _ShardStream(IterableDataset):
    """One rank's shards; each DataLoader worker streams its planned share into batches."""

    def __init__(
        self,
        source: ShardPairs,
        plans: list[_WorkerPlan],
        skipped: list[int],
        first: int,
        example: Example,
        seed: int,
        epoch: int,
        rank: int,
        batch_size: int,
        shuffle_buffer: int,
        drop_last: bool,
    ) -> None:
        self.urls = [str(shard) for shard in source.shards]
        self.plans, self.skipped, self.first, self.example = plans, skipped, first, example
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.batch_size, self.shuffle_buffer, self.drop_last = batch_size, shuffle_buffer, drop_last

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % len(self.plans)
        plan = self.plans[worker]
        skip = min(self.skipped[worker] * self.batch_size, plan.samples)
        stages: list[Any] = [
            wds.SimpleShardList([self.urls[i] for i in plan.shards]),
            wds.tarfile_to_samples(),
            _with_image,
            _ExpectCount(plan.samples, worker),
        ]
        if self.shuffle_buffer > 1:
            state = np.random.SeedSequence([self.seed, self.epoch, _BUFFER, self.rank, worker])
            rng = random.Random(int(state.generate_state(1, np.uint64)[0]))
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng))
        stages += [
            # Skipped samples are dropped as raw bytes: never decoded, never augmented.
            lambda samples: itertools.islice(samples, skip, None),
            wds.map(self._example),
            wds.batched(self.batch_size, collation_fn=_collate, partial=not self.drop_last),
        ]
        for index, batch in enumerate(wds.DataPipeline(*stages), start=self.skipped[worker]):
            yield worker, index, batch

    def _example(self, sample: dict[str, Any]) -> tuple[str, dict]:
        return _make_example(_decode_sample(sample), self.example, self.seed, self.epoch)


def _with_image(samples: Iterable[dict]) -> Iterator[dict]:
    # Keys without an image (stray files) are not samples; count_shard_samples agrees.
    return (s for s in samples if any(ext in s for ext in IMAGE_EXTENSIONS))


class _ExpectCount:
    """Fail loudly if a worker's stream disagrees with the header count it was planned on."""

    def __init__(self, expected: int, worker: int) -> None:
        self.expected, self.worker = expected, worker

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        seen = 0
        for sample in samples:
            seen += 1
            yield sample
        if seen != self.expected:
            raise RuntimeError(
                f"loader worker {self.worker} read {seen} samples but the tar headers "
                f"promised {self.expected}; were the shards changed during the epoch?"
            )


def pair_batches(
    source: PairSource,
    *,
    example: Example,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool = True,
) -> Iterator[dict[str, Any]]:
    """Batches of one epoch for one rank: ``example`` outputs stacked, plus ``"keys"``.

    ``example(pair, rng)`` must be picklable (it runs in DataLoader workers) and return a
    dict of equally shaped tensors; ``pair`` carries this visit's caption, ``rng`` is
    seeded by (seed, epoch, key). ``start_batch=k`` yields batches k, k+1, ... of the same
    epoch. See the module docstring for what is and is not guaranteed.
    """
    # Plan (and fail) here, eagerly, rather than on the first next() of a generator.
    source = open_pairs(source)
    _check_loader_args(batch_size, start_batch, rank, world_size)
    _check_seed(seed, epoch)
    if isinstance(source, PairTable):
        batches = _table_batches(source, batch_size, seed, epoch, rank, world_size, drop_last)
        dataset = _TableExamples(source, example, seed, epoch)
        return _table_iterator(dataset, batches[start_batch:], num_workers)
    plans = _shard_plans(source, batch_size, seed, epoch, rank, world_size, num_workers, drop_last)
    counts = [plan.batches for plan in plans]
    skipped, first = _resume_point(counts, start_batch)
    stream = _ShardStream(
        source,
        plans,
        skipped,
        first,
        example,
        seed,
        epoch,
        rank,
        batch_size,
        shuffle_buffer,
        drop_last,
    )
    return _shard_iterator(stream, counts, start_batch, num_workers)


def _table_iterator(
    dataset: _TableExamples, batches: list[list[int]], num_workers: int
) -> Iterator[dict[str, Any]]:
    if not batches:
        return
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate
    )
    yield from loader


def _shard_iterator(
    stream: _ShardStream, counts: list[int], start_batch: int, num_workers: int
) -> Iterator[dict[str, Any]]:
    if sum(counts) <= start_batch:
        return
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_passthrough)
    expected = itertools.islice(_round_robin(counts), start_batch, None)
    for worker, index, batch in loader:
        planned = next(expected, None)
        if planned != (worker, index):
            raise RuntimeError(
                f"loader produced batch {index} of worker {worker} where the resume plan "
                f"expected {planned}; the DataLoader's worker interleaving changed, so exact "
                "resume cannot be guaranteed"
            )
        yield batch
