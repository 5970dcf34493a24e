"""The batch loader over image-caption sources: deterministic, resumable, split by rank
and worker.

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
    * Bad samples (decoding raised :class:`BadSample`) keep their place in the plan: they
      are dropped from the batch they were planned in, which then holds fewer examples,
      and listed in its ``"skipped"`` entry. So batches stay the same, bit for bit, on
      resume, and counts of bad samples travel with the batches (exact with any number of
      workers). A batch of bad samples only has ``"ids"`` empty and no example fields.
    * Resampled (:class:`Resampled`): each (rank, worker) draws shards with replacement,
      seeded by (seed, epoch, rank, worker), until it holds its share of one pass; so a
      sample may come twice in an epoch or not at all, ranks may draw the same shard, and
      ``start_batch=k`` is exact as above.
    * Not guaranteed: the same batches after the data changes, or across versions of
      numpy, webdataset or Pillow (permutations, the shuffle buffer and decoders may move).
      Sample counts come from local tar headers, a parquet file's footer (a parquet file
      is a shard, see ``parquet_samples.py``), or for a remote shard from its
      ``_stats.json`` or one streamed count, cached (``shards.py``, ``remote.py``).
"""

from __future__ import annotations

import itertools
import random
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from threetowers.data.sources.bad_samples import BadSample, Skipped
from threetowers.data.sources.pair import (
    BUFFER_STREAM,
    RESAMPLE_STREAM,
    Pair,
    check_seed,
    sample_rng,
)
from threetowers.data.sources.pairs import PairSource, open_pairs
from threetowers.data.sources.shards import (
    ShardPairs,
    decode_sample,
    shard_sample_id,
    shard_samples,
)
from threetowers.data.sources.table import PairTable

Example = Callable[[Pair, np.random.Generator], dict[str, torch.Tensor | str]]
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


@dataclass(frozen=True)
class Resampled:
    """Shards drawn with replacement, each in proportion to its weight (one per shard of the
    source), as webdataset's ResampledShards draws them: for each (rank, worker), seeded by
    (seed, epoch, rank, worker), until the worker holds its share of one pass over the data.
    An epoch is then a stretch of that length, not a visit of every sample; a resume draws
    the same shards again, so it stays exact. Weights per source: :func:`source_weights`."""

    weights: tuple[float, ...]


def source_weights(sizes: Sequence[int], sources: Sequence[int], weights: Sequence[float]):
    """Per-shard weights under which source ``k`` (``sources[i]``: shard i's source) gives
    ``weights[k] / sum(weights)`` of the samples drawn, each of its samples alike: a shard
    holding samples weighs ``weights[k] / (samples of source k)``, whatever its size (a
    drawn shard gives all its samples)."""
    totals = np.zeros(len(weights))
    np.add.at(totals, np.asarray(sources), np.asarray(sizes, dtype=float))
    return tuple(
        float(weights[k] / totals[k]) if size else 0.0
        for size, k in zip(sizes, sources, strict=True)
    )


def _shard_plans(
    source: ShardPairs,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    workers: int,
    drop: bool,
    resampled: Resampled | None = None,
) -> list[_WorkerPlan]:
    streams = max(1, workers)
    if resampled is not None:
        return _resampled_plans(
            source, resampled, batch_size, seed, epoch, rank, world, streams, drop
        )
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


def _resampled_plans(
    source: ShardPairs,
    resampled: Resampled,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    streams: int,
    drop: bool,
) -> list[_WorkerPlan]:
    weights = np.asarray(resampled.weights, dtype=float)
    if len(weights) != len(source.shards) or not weights.sum() > 0:
        raise ValueError("resampling needs one non-negative weight per shard, not all zero")
    share = -(-len(source) // (world * streams))  # each worker's part of one pass
    plans = []
    for worker in range(streams):
        rng = np.random.default_rng([seed, epoch, RESAMPLE_STREAM, rank, worker])
        shards, samples = [], 0
        while samples < share:
            shard = int(rng.choice(len(weights), p=weights / weights.sum()))
            shards.append(shard)
            samples += source.sizes[shard]
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
    resampled: Resampled | None = None,
) -> int:
    """Batches :func:`pair_batches` yields for ``rank`` in this epoch (from ``start_batch=0``)."""
    source = open_pairs(source)
    _check_loader_args(batch_size, 0, rank, world_size)
    if isinstance(source, PairTable):
        return len(_table_batches(source, batch_size, seed, epoch, rank, world_size, drop_last))
    plans = _shard_plans(
        source, batch_size, seed, epoch, rank, world_size, num_workers, drop_last, resampled
    )
    return sum(plan.batches for plan in plans)


# --------------------------------------------------------------------------- loading


def _make_example(pair: Pair, example: Example, seed: int, epoch: int) -> tuple[str, dict]:
    # Seeded by the key, not the id: the draws stay those of every earlier release, and
    # samples of two shards that share a key still read their own image and captions.
    rng = sample_rng(seed, epoch, pair.key)
    caption = pair.captions[int(rng.integers(len(pair.captions)))]
    fields = example(Pair(pair.key, pair.image, [caption], pair.id, pair.row), rng)
    if not isinstance(fields, dict) or "ids" in fields:
        raise TypeError(
            "example must return a dict of tensors or strings without an 'ids' entry (the loader "
            "adds it)"
        )
    return pair.id, fields


def _collate(items: list[tuple[str, dict] | Skipped]) -> dict[str, Any]:
    """Tensors are stacked; strings (e.g. captions to tokenise per batch) become lists; bad
    samples are left out and listed under ``"skipped"``."""
    skipped = [item for item in items if isinstance(item, Skipped)]
    items = [item for item in items if not isinstance(item, Skipped)]
    if not items:
        return {"ids": [], "skipped": skipped}
    names = list(items[0][1])
    batch: dict[str, Any] = {}
    for name in names:
        if isinstance(items[0][1][name], str):
            batch[name] = [fields[name] for _, fields in items]
            continue
        try:
            batch[name] = torch.stack([fields[name] for _, fields in items])
        except (KeyError, TypeError, RuntimeError) as error:
            raise ValueError(
                f"cannot batch example field {name!r}: every example must return the same "
                f"fields, as strings or as tensors of one shape ({error})"
            ) from error
    batch["ids"] = [sample_id for sample_id, _ in items]
    batch["skipped"] = skipped
    return batch


def _passthrough(item: Any) -> Any:
    return item


class _TableExamples(Dataset):
    def __init__(self, table: PairTable, example: Example, seed: int, epoch: int) -> None:
        self.table, self.example, self.seed, self.epoch = table, example, seed, epoch

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[str, dict] | Skipped:
        try:
            pair = self.table[index]
        except BadSample as bad:
            return bad.skipped(self.table.ids[index])
        return _make_example(pair, self.example, self.seed, self.epoch)


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
        self.first_rows, self.fields = source.first_rows, source.fields
        self.plans, self.skipped, self.first, self.example = plans, skipped, first, example
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.batch_size, self.shuffle_buffer, self.drop_last = batch_size, shuffle_buffer, drop_last

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % len(self.plans)
        plan = self.plans[worker]
        skip = min(self.skipped[worker] * self.batch_size, plan.samples)
        shards = [self.urls[i] for i in plan.shards]
        stages: list[Any] = [
            lambda: shard_samples(shards, [self.first_rows[i] for i in plan.shards], self.fields),
            _ExpectCount(plan.samples, worker),
        ]
        if self.shuffle_buffer > 1:
            state = np.random.SeedSequence(
                [self.seed, self.epoch, BUFFER_STREAM, self.rank, worker]
            )
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

    def _example(self, sample: dict[str, Any]) -> tuple[str, dict] | Skipped:
        try:
            pair = decode_sample(sample, self.fields)
        except BadSample as bad:
            return bad.skipped(shard_sample_id(sample))
        return _make_example(pair, self.example, self.seed, self.epoch)


class _ExpectCount:
    """Fail loudly if a worker's stream disagrees with the count it was planned on (tar
    headers, parquet footers)."""

    def __init__(self, expected: int, worker: int) -> None:
        self.expected, self.worker = expected, worker

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        seen = 0
        for sample in samples:
            seen += 1
            yield sample
        if seen != self.expected:
            raise RuntimeError(
                f"loader worker {self.worker} read {seen} samples but the shards' tar "
                f"headers or parquet footers promised {self.expected}; were the shards "
                "changed during the epoch?"
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
    resampled: Resampled | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches of one epoch for one rank: ``example`` outputs stacked, plus ``"ids"`` (each
    sample's id, see :class:`~threetowers.data.sources.pair.Pair`).

    ``example(pair, rng)`` must be picklable (it runs in DataLoader workers) and return a
    dict of equally shaped tensors; ``pair`` carries this visit's caption, ``rng`` is
    seeded by (seed, epoch, key). ``start_batch=k`` yields batches k, k+1, ... of the same
    epoch. Bad samples are left out of their batch and listed in its ``"skipped"``. See the
    module docstring for what is and is not guaranteed. ``resampled``: shards drawn with
    replacement (:class:`Resampled`; shard sources only).
    """
    # Plan (and fail) here, eagerly, rather than on the first next() of a generator.
    source = open_pairs(source)
    _check_loader_args(batch_size, start_batch, rank, world_size)
    check_seed(seed, epoch)
    if isinstance(source, PairTable):
        if resampled is not None:
            raise ValueError("resampling draws shards: a table is read as it is (no resampled)")
        batches = _table_batches(source, batch_size, seed, epoch, rank, world_size, drop_last)
        dataset = _TableExamples(source, example, seed, epoch)
        return _table_iterator(dataset, batches[start_batch:], num_workers)
    plans = _shard_plans(
        source, batch_size, seed, epoch, rank, world_size, num_workers, drop_last, resampled
    )
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


def _ignore_sigterm(_worker: int) -> None:
    """A job's SIGTERM reaches its whole process group: the workers leave it to the training
    process, which stops at a step boundary and then shuts them down (a killed worker would
    fail the next batch instead)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _table_iterator(
    dataset: _TableExamples, batches: list[list[int]], num_workers: int
) -> Iterator[dict[str, Any]]:
    if not batches:
        return
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_ignore_sigterm,
    )
    yield from loader


def _shard_iterator(
    stream: _ShardStream, counts: list[int], start_batch: int, num_workers: int
) -> Iterator[dict[str, Any]]:
    if sum(counts) <= start_batch:
        return
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_passthrough,
        worker_init_fn=_ignore_sigterm,
    )
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
