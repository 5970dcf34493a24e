"""The batch loader over image-caption sources: deterministic, resumable, split by rank
and worker. An epoch is planned first (``plan.py``: which samples, which rank and worker,
which order), then read by the DataLoader's workers (``workers.py``).

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
      ``_stats.json`` or one streamed count, cached (``shards.py``, ``remote_counts.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from threetowers.data.sources.pair import check_seed
from threetowers.data.sources.pairs import PairSource, open_pairs
from threetowers.data.sources.plan import (
    Resampled,
    check_loader_args,
    resume_point,
    round_robin,
    shard_plans,
    table_batches,
)
from threetowers.data.sources.table import PairTable
from threetowers.data.sources.workers import (
    Collate,
    Example,
    Prepare,
    ShardReader,
    ShardStream,
    TableExamples,
    defer_sigterm,
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
    encoded_images: bool = False,
    prepare: Prepare | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches of one epoch for one rank: ``example`` outputs stacked, plus ``"ids"`` (each
    sample's id, see :class:`~threetowers.data.sources.pair.Pair`).

    ``example(pair, rng)`` must be picklable (it runs in DataLoader workers) and return a
    dict of equally shaped tensors; ``pair`` carries this visit's caption, ``rng`` is
    seeded by (seed, epoch, key). ``start_batch=k`` yields batches k, k+1, ... of the same
    epoch. Bad samples are left out of their batch and listed in its ``"skipped"``. See the
    module docstring for what is and is not guaranteed. ``resampled``: shards drawn with
    replacement (:class:`Resampled`; shard sources only). ``encoded_images``: ``pair.image``
    is an :class:`~threetowers.data.sources.decode.EncodedImage`, which the example decodes
    at the size it needs (the training transforms do), and a :class:`BadSample` it raises
    skips the sample. ``prepare(batch)``: run on each collated batch in the worker.
    """
    # Plan (and fail) here, eagerly, rather than on the first next() of a generator.
    source = checked_source(
        source, batch_size, seed, epoch, start_batch, rank, world_size, resampled
    )
    if isinstance(source, PairTable):
        batches = table_batches(source, batch_size, seed, epoch, rank, world_size, drop_last)
        dataset = TableExamples(source, example, seed, encoded_images)
        indices = [[(epoch, row) for row in rows] for rows in batches[start_batch:]]
        return _table_iterator(dataset, indices, num_workers, Collate(prepare))
    plans = shard_plans(
        source, batch_size, seed, epoch, rank, world_size, num_workers, drop_last, resampled
    )
    counts = [plan.batches for plan in plans]
    skipped, first = resume_point(counts, start_batch)
    reader = ShardReader(
        source, example, seed, rank, batch_size, shuffle_buffer, drop_last, encoded_images, prepare
    )
    stream = ShardStream(reader, plans, skipped, first, epoch)
    return _shard_iterator(stream, counts, start_batch, num_workers)


def checked_source(
    source: PairSource,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int,
    rank: int,
    world_size: int,
    resampled: Resampled | None,
) -> PairSource:
    """``source`` opened, the loader's arguments checked (for any loader over it)."""
    source = open_pairs(source)
    check_loader_args(batch_size, start_batch, rank, world_size)
    check_seed(seed, epoch)
    if resampled is not None and isinstance(source, PairTable):
        raise ValueError("resampling draws shards: a table is read as it is (no resampled)")
    return source


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
    check_loader_args(batch_size, 0, rank, world_size)
    if isinstance(source, PairTable):
        return len(table_batches(source, batch_size, seed, epoch, rank, world_size, drop_last))
    plans = shard_plans(
        source, batch_size, seed, epoch, rank, world_size, num_workers, drop_last, resampled
    )
    return sum(plan.batches for plan in plans)


def _table_iterator(
    dataset: TableExamples, batches: list[list[tuple[int, int]]], num_workers: int, collate
) -> Iterator[dict[str, Any]]:
    if not batches:
        return
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=defer_sigterm,
    )
    yield from loader


def _shard_iterator(
    stream: ShardStream, counts: list[int], start_batch: int, num_workers: int
) -> Iterator[dict[str, Any]]:
    if sum(counts) <= start_batch:
        return
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_passthrough,
        worker_init_fn=defer_sigterm,
    )
    expected = itertools.islice(round_robin(counts), start_batch, None)
    for worker, index, batch in loader:
        planned = next(expected, None)
        if planned != (worker, index):
            raise RuntimeError(
                f"loader produced batch {index} of worker {worker} where the resume plan "
                f"expected {planned}; the DataLoader's worker interleaving changed, so exact "
                "resume cannot be guaranteed"
            )
        yield batch


def _passthrough(item: Any) -> Any:  # a shard worker yields whole batches
    return item
