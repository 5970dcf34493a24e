"""What runs in the DataLoader's workers: a sample made an example, examples a batch.

A table's rows are read by index (:class:`TableExamples`, batched by the plan's
``batch_sampler``); a shard worker streams its planned shards through its shuffle buffer
into whole batches (:class:`ShardStream`). A sample that fails to decode is kept as
:class:`Skipped` and leaves its batch (:func:`collate`), so the plan never moves.
"""

from __future__ import annotations

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


class TableExamples(Dataset):
    """A table's rows as examples, read by index; a bad row is its :class:`Skipped`."""

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


class ShardStream(IterableDataset):
    """One rank's shards; each DataLoader worker streams its planned share into batches."""

    def __init__(
        self,
        source: ShardPairs,
        plans: list[WorkerPlan],
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
            wds.batched(self.batch_size, collation_fn=collate, partial=not self.drop_last),
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


def ignore_sigterm(_worker: int) -> None:
    """A job's SIGTERM reaches its whole process group: the workers leave it to the training
    process, which stops at a step boundary and then shuts them down (a killed worker would
    fail the next batch instead)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
