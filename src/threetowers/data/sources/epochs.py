"""The loader across epochs: one DataLoader for a whole run, its workers kept from epoch
to epoch.

A DataLoader made per epoch starts its worker processes again and refills their shuffle
buffers every epoch while the device waits. :func:`pair_stream` reads epoch after epoch
from a start position through one DataLoader: its workers persist (``persistent_workers``),
keep ``PREFETCH`` batches each in flight, and read the next epoch's first batches while the
last of this one are trained on.

Each epoch's batches are :func:`~threetowers.data.sources.loader.pair_batches`' for that
epoch, bit for bit: the same plan, the same resume point, every rank cut to the batches of
the rank with the fewest (ranks may plan different counts of shard batches). A DataLoader
takes one item from each worker in turn; the workers' shares of an epoch hold different
numbers of batches, so each worker pads its epoch to the epoch's rounds with empty items,
which the main process drops, and the turns stay aligned from epoch to epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from threetowers.data.sources.loader import checked_source
from threetowers.data.sources.pairs import PairSource
from threetowers.data.sources.plan import (
    Resampled,
    WorkerPlan,
    batch_count,
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
    TableExamples,
    defer_sigterm,
)

# Batches each worker keeps ready: enough to ride out one slow image, few enough that the
# pinned host memory stays small (PyTorch's default).
PREFETCH = 2


def pair_stream(
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
    pin_memory: bool = False,
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(epoch, batch index in it, batch) from batch ``start_batch`` of ``epoch`` on, epoch
    after epoch; the arguments are :func:`~threetowers.data.sources.loader.pair_batches`'.
    It ends at the first epoch that holds no batch for every rank (the caller says why);
    ``pin_memory``: batches in page-locked memory, to be copied to a GPU asynchronously."""
    source = checked_source(
        source, batch_size, seed, epoch, start_batch, rank, world_size, resampled
    )
    epochs = _Epochs(source, batch_size, seed, rank, world_size, num_workers, drop_last, resampled)
    if isinstance(source, PairTable):
        dataset = TableExamples(source, example, seed, encoded_images)
        batches = _TableEpochs(epochs, epoch, start_batch)
        loader = _loader(
            dataset, num_workers, pin_memory, batch_sampler=batches, collate_fn=Collate(prepare)
        )
        return _table_stream(epochs, iter(loader), epoch, start_batch)
    reader = ShardReader(
        source, example, seed, rank, batch_size, shuffle_buffer, drop_last, encoded_images, prepare
    )
    stream = _ShardEpochs(epochs, reader, epoch, start_batch)
    loader = _loader(stream, num_workers, pin_memory, batch_size=None, collate_fn=_passthrough)
    return _shard_stream(epochs, iter(loader), epoch, start_batch)


class _Epochs:
    """Each epoch's plan for one rank, as the main process and every worker compute it."""

    def __init__(self, source, batch_size, seed, rank, world, workers, drop, resampled) -> None:
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world, self.workers = rank, world, workers
        self.drop, self.resampled = drop, resampled

    def table(self, epoch: int) -> list[list[int]]:
        """A table's batches of rows for this rank, cut to the least rank's count."""
        batches = table_batches(
            self.source, self.batch_size, self.seed, epoch, self.rank, self.world, self.drop
        )
        size, world = len(self.source), self.world
        shares = [size // world if self.drop else -(-(size - r) // world) for r in range(world)]
        return batches[: min(batch_count(n, self.batch_size, self.drop) for n in shares)]

    def shards(self, epoch: int) -> tuple[list[WorkerPlan], list[tuple[int, int]]]:
        """The workers' plans, and the (worker, batch) the DataLoader yields in order, cut to
        the least rank's count."""
        plans = self._plans(epoch, self.rank)
        least = sum(plan.batches for plan in plans)
        for other in range(self.world):
            if other != self.rank:
                least = min(least, sum(plan.batches for plan in self._plans(epoch, other)))
        order = list(itertools.islice(round_robin([plan.batches for plan in plans]), least))
        return plans, order

    def _plans(self, epoch: int, rank: int) -> list[WorkerPlan]:
        return shard_plans(
            self.source,
            self.batch_size,
            self.seed,
            epoch,
            rank,
            self.world,
            self.workers,
            self.drop,
            self.resampled,
        )


def _loader(dataset, num_workers: int, pin_memory: bool, **batching) -> DataLoader:
    return DataLoader(
        dataset,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=PREFETCH if num_workers > 0 else None,
        pin_memory=pin_memory,
        worker_init_fn=defer_sigterm,
        **batching,
    )


class _TableEpochs:
    """A table's batches of (epoch, row), epoch after epoch: the loader's batch sampler."""

    def __init__(self, epochs: _Epochs, epoch: int, start_batch: int) -> None:
        self.epochs, self.epoch, self.start_batch = epochs, epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start_batch
        while batches := self.epochs.table(epoch):
            for rows in batches[start:]:
                yield [(epoch, row) for row in rows]
            epoch, start = epoch + 1, 0


def _table_stream(epochs: _Epochs, loader, epoch: int, start: int):
    while length := len(epochs.table(epoch)):
        for index in range(start, length):
            yield epoch, index, next(loader)
        epoch, start = epoch + 1, 0


class _ShardEpochs(IterableDataset):
    """One rank's shards epoch after epoch: each worker yields (epoch, its plan's worker,
    batch index, batch), one item per round of the epoch, None where it has no batch."""

    def __init__(self, epochs: _Epochs, reader: ShardReader, epoch: int, start: int) -> None:
        self.epochs, self.reader, self.epoch, self.start = epochs, reader, epoch, start

    def __iter__(self) -> Iterator[tuple[int, int, int, dict | None]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, start = self.epoch, self.start
        while True:
            plans, order = self.epochs.shards(epoch)
            if not order:
                return
            skipped = resume_point([plan.batches for plan in plans], start)[0][worker]
            mine = sum(1 for owner, _ in order if owner == worker)
            batches = self.reader.batches(plans[worker], worker, skipped, epoch)
            batches = itertools.islice(batches, max(0, mine - skipped))
            first = order[start][1] if start < len(order) else order[-1][1] + 1
            for index in range(first, order[-1][1] + 1):
                yield epoch, worker, index, next(batches) if skipped <= index < mine else None
            epoch, start = epoch + 1, 0


def _shard_stream(epochs: _Epochs, loader, epoch: int, start: int):
    items = (item for item in loader if item[3] is not None)
    while True:
        _, order = epochs.shards(epoch)
        if not order:
            return
        for index in range(start, len(order)):
            got_epoch, worker, got_index, batch = next(items)
            if (got_epoch, worker, got_index) != (epoch, *order[index]):
                raise RuntimeError(
                    f"loader produced batch {got_index} of worker {worker} in epoch "
                    f"{got_epoch} where the plan expected {order[index]} of epoch {epoch}; the "
                    "DataLoader's worker interleaving changed, so exact resume cannot be "
                    "guaranteed"
                )
            yield epoch, index, batch
        epoch, start = epoch + 1, 0


def _passthrough(item: Any) -> Any:  # a shard worker yields whole batches
    return item
