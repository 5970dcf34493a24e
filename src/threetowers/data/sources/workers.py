"""What runs in the DataLoader's workers: a sample made an example, examples a batch.

A table's rows are read by index (:class:`TableExamples`, batched by the plan's
``batch_sampler``); a shard worker streams its planned shards through its shuffle buffer
into whole batches (:class:`ShardStream`). A sample that fails to decode is kept as
:class:`Skipped` and leaves its batch (:func:`collate`), so the plan never moves.
"""

from __future__ import annotations

import functools
import itertools
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from threetowers.data.sources.bad_samples import BadSample, Skipped
from threetowers.data.sources.pair import BUFFER_STREAM, Pair, sample_rng
from threetowers.data.sources.plan import WorkerPlan
from threetowers.data.sources.shards import (
    ShardPairs,
    decode_sample,
    shard_sample_id,
    shard_samples,
)
from threetowers.data.sources.table import PairTable

Example = Callable[[Pair, np.random.Generator], dict[str, torch.Tensor | str]]


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


def collate(items: list[tuple[str, dict] | Skipped]) -> dict[str, Any]:
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


Prepare = Callable[[dict[str, Any]], dict[str, Any]]  # a collated batch -> the step's


class Collate:
    """:func:`collate`, then ``prepare`` (where given): in the worker, so that the training
    process receives batches ready for the device."""

    def __init__(self, prepare: Prepare | None = None) -> None:
        self.prepare = prepare

    def __call__(self, items: list[tuple[str, dict] | Skipped]) -> dict[str, Any]:
        batch = collate(items)
        return batch if self.prepare is None else self.prepare(batch)


class TableExamples(Dataset):
    """A table's rows as examples, read by (epoch, row); a bad row is its :class:`Skipped`."""

    def __init__(self, table: PairTable, example: Example, seed: int, encoded: bool) -> None:
        self.table, self.example, self.seed = table, example, seed
        self.encoded = encoded  # hand ``example`` an EncodedImage

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: tuple[int, int]) -> tuple[str, dict] | Skipped:
        epoch, row = index
        try:
            pair = self.table.pair(row, encoded=True) if self.encoded else self.table[row]
            return _make_example(pair, self.example, self.seed, epoch)
        except BadSample as bad:
            return bad.skipped(self.table.ids[row])


class ShardReader:
    """How one rank's shards become a loader worker's batches: its planned shards through
    its shuffle buffer, the samples before its resume point skipped as raw bytes."""

    def __init__(
        self,
        source: ShardPairs,
        example: Example,
        seed: int,
        rank: int,
        batch_size: int,
        shuffle_buffer: int,
        drop_last: bool,
        encoded: bool = False,
        prepare: Prepare | None = None,
    ) -> None:
        self.urls = [str(shard) for shard in source.shards]
        self.first_rows, self.fields = source.first_rows, source.fields
        self.example, self.seed, self.rank = example, seed, rank
        self.batch_size, self.shuffle_buffer, self.drop_last = batch_size, shuffle_buffer, drop_last
        self.encoded = encoded  # hand ``example`` an EncodedImage
        self.collate = Collate(prepare)

    def batches(self, plan: WorkerPlan, worker: int, skipped: int, epoch: int) -> Iterator[dict]:
        """The batches of ``plan`` (plan worker ``worker``'s in ``epoch``) after its first
        ``skipped``."""
        skip = min(skipped * self.batch_size, plan.samples)
        shards = [self.urls[i] for i in plan.shards]
        stages: list[Any] = [
            lambda: shard_samples(shards, [self.first_rows[i] for i in plan.shards], self.fields),
            _ExpectCount(plan.samples, worker),
        ]
        if self.shuffle_buffer > 1:
            state = np.random.SeedSequence([self.seed, epoch, BUFFER_STREAM, self.rank, worker])
            rng = random.Random(int(state.generate_state(1, np.uint64)[0]))
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng))
        stages += [
            # Skipped samples are dropped as raw bytes: never decoded, never augmented.
            lambda samples: itertools.islice(samples, skip, None),
            wds.map(functools.partial(self._example, epoch=epoch)),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=not self.drop_last),
        ]
        return iter(wds.DataPipeline(*stages))

    def _example(self, sample: dict[str, Any], epoch: int) -> tuple[str, dict] | Skipped:
        try:
            pair = decode_sample(sample, self.fields, encoded=self.encoded)
            return _make_example(pair, self.example, self.seed, epoch)
        except BadSample as bad:
            return bad.skipped(shard_sample_id(sample))


class ShardStream(IterableDataset):
    """One rank's shards in one epoch; each DataLoader worker streams its planned share."""

    def __init__(
        self,
        reader: ShardReader,
        plans: list[WorkerPlan],
        skipped: list[int],
        first: int,
        epoch: int,
    ) -> None:
        self.reader, self.plans, self.skipped, self.first, self.epoch = (
            reader,
            plans,
            skipped,
            first,
            epoch,
        )

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % len(self.plans)
        skipped = self.skipped[worker]
        batches = self.reader.batches(self.plans[worker], worker, skipped, self.epoch)
        for index, batch in enumerate(batches, start=skipped):
            yield worker, index, batch


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


# How long a loader worker goes on after SIGTERM. A job's SIGTERM reaches every process of
# it; the training process needs a batch or two more to reach its step boundary, checkpoint
# and shut its workers down, which is far less. A worker that nobody shuts down (its process
# is exiting after an error, and exit terminates its children with SIGTERM, then waits on
# them) ends then, rather than blocking that exit for ever.
SIGTERM_GRACE_S = 30


def defer_sigterm(_worker: int) -> None:
    """A loader worker's SIGTERM ends it only after :data:`SIGTERM_GRACE_S` (SIGALRM's
    default action), so that the training process, not the signal, shuts it down."""
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(SIGTERM_GRACE_S))
