"""Which samples go where in one epoch, decided before anything is read.

A table's rows are permuted by (seed, epoch), dealt to ranks and cut into batches; shards
are ordered by (seed, epoch) (or drawn with replacement, :class:`Resampled`), dealt to
ranks, then to loader workers, each worker's share a number of whole batches
(:class:`WorkerPlan`). The DataLoader interleaves its workers round-robin
(:func:`round_robin`), which makes a resume point a count of batches per worker
(:func:`resume_point`). Nothing here reads a sample: plans come from row and shard counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from threetowers.data.sources.pair import RESAMPLE_STREAM
from threetowers.data.sources.shards import ShardPairs
from threetowers.data.sources.table import PairTable
from threetowers.errors import UserError


class TooFewShardsError(UserError, ValueError):
    """The shards cannot give every loader worker of every rank one of its own."""


def check_loader_args(batch_size: int, start_batch: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be non-negative, got {start_batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def batch_count(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def table_batches(
    table: PairTable, batch_size: int, seed: int, epoch: int, rank: int, world: int, drop: bool
) -> list[list[int]]:
    order = table.order(seed, epoch)
    share = order[rank::world]
    if drop:  # equal shares, so every rank takes the same number of steps
        share = share[: len(table) // world]
    count = batch_count(len(share), batch_size, drop)
    return [share[i * batch_size : (i + 1) * batch_size].tolist() for i in range(count)]


@dataclass(frozen=True)
class WorkerPlan:
    """One loader worker's share of an epoch: its shards in reading order, their samples
    and the whole batches they make."""

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


def shard_plans(
    source: ShardPairs,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    workers: int,
    drop: bool,
    resampled: Resampled | None = None,
) -> list[WorkerPlan]:
    streams = max(1, workers)
    if resampled is not None:
        return _resampled_plans(
            source, resampled, batch_size, seed, epoch, rank, world, streams, drop
        )
    if len(source.shards) < world * streams:
        raise TooFewShardsError(
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
        plans.append(WorkerPlan(shards, samples, batch_count(samples, batch_size, drop)))
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
) -> list[WorkerPlan]:
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
        plans.append(WorkerPlan(shards, samples, batch_count(samples, batch_size, drop)))
    return plans


def _assigned(order: list[int], rank: int, world: int, worker: int, workers: int) -> list[int]:
    # Same split as webdataset's split_by_node / split_by_worker, but with an explicit rank.
    return list(itertools.islice(itertools.islice(order, rank, None, world), worker, None, workers))


def round_robin(counts: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(worker, batch index) in the order a DataLoader interleaves IterableDataset workers
    (polled cyclically from worker 0): round by round, each worker that still has batches
    contributes its next one."""
    for round_index in range(max(counts, default=0)):
        for worker, count in enumerate(counts):
            if round_index < count:
                yield worker, round_index


def resume_point(counts: Sequence[int], start_batch: int) -> tuple[list[int], int]:
    """How many of each worker's batches fall within the first ``start_batch`` batches, and
    which worker owes the next one.

    A fresh DataLoader always polls its worker 0 first, so on resume loader worker ``i``
    runs plan worker ``(i + next) % workers``: the rotation continues the interrupted round
    and then the later rounds in plan order, exhausted workers skipped as before.
    """
    skipped = [0] * len(counts)
    schedule = round_robin(counts)
    for worker, _ in itertools.islice(schedule, start_batch):
        skipped[worker] += 1
    upcoming = next(schedule, None)
    return skipped, upcoming[0] if upcoming is not None else 0
