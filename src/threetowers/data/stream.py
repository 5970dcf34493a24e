"""The training data as one endless stream of global batches, resumable from its position.

:class:`BatchStream` reads epoch after epoch of this rank's batches
(``TrainingData.stream``) from a :class:`Position`, which it advances and a checkpoint
saves; the batches reach the device as ``data/device.py`` takes them there. Each batch is
agreed on by the ranks in one tensor collective: every rank's sample count, its bad samples
by reason and its samples by source, and whether it was asked to stop; the bad samples'
names are gathered too only while the ``BadSampleLog`` still names them. A batch of which
some rank holds no sample is counted and passed over, so the ranks move together; every
other batch is yielded, to be one step. An epoch read whole without one is an error, not a
hang.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from threetowers import distributed
from threetowers.data.device import on_device
from threetowers.data.pipeline import TrainingData
from threetowers.data.sources.bad_samples import REASONS, BadDataError, BadSampleLog
from threetowers.data.sources.mix import SourceCounts

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where the stream stands: its epoch, and how many of that epoch's batches were read
    (those passed over included)."""

    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass(frozen=True)
class GlobalBatch:
    """This rank's share of one step's batch, and what the ranks agreed on with it."""

    tensors: dict  # the prepared share on the device (normalised unless the step does it),
    # its bad samples taken out
    counts: list[int]  # every rank's sample count: the global batch
    stop: bool  # some rank was asked to stop: all stop after this step


class BatchStream:
    """Endless and resumable: iterating starts at ``position``, and the position always
    names the batch that comes next."""

    def __init__(
        self,
        data: TrainingData,
        position: Position,
        bad_data: BadSampleLog,
        sources: SourceCounts,
        stop: Callable[[], bool] = lambda: False,
        device: torch.device | None = None,
        normalise: bool = True,
    ) -> None:
        self.data, self.position, self.bad_data, self.sources = data, position, bad_data, sources
        self.stop = stop  # polled at each batch and agreed on in its exchange
        self.device = device or torch.device("cpu")  # where the batches go
        self.normalise = normalise  # False: the views stay uint8, for the step to normalise

    def __iter__(self) -> Iterator[GlobalBatch]:
        at = self.position
        whole, yielded = at.batch_in_epoch == 0, False  # of the epoch being read
        pin = self.device.type == "cuda"
        batches = self.data.stream(at.epoch, at.batch_in_epoch, pin_memory=pin)
        views = self.data.views if self.normalise else None
        for tensors in on_device(batches, self.device, views):
            epoch, index = tensors.pop("position")
            if epoch != at.epoch:  # the epoch before is read whole
                self._check_gave_a_batch(at.epoch, whole, yielded)
                at.epoch, whole, yielded = epoch, True, False
            batch = self._agreed(tensors)
            at.batch_in_epoch = index + 1
            if min(batch.counts) == 0:  # some rank has nothing left: no step
                if sum(batch.counts):
                    log.warning(
                        "batch %d of epoch %d: a rank's share held only bad samples, so the "
                        "other ranks' %d samples were not trained on",
                        index,
                        epoch,
                        sum(batch.counts),
                    )
                continue
            yielded = True
            yield batch
        self._check_gave_a_batch(at.epoch, whole, yielded)
        # the stream ends only at an epoch that holds no batch at all
        self._check_gave_a_batch(at.epoch + (at.batch_in_epoch > 0), True, False)

    def _check_gave_a_batch(self, epoch: int, whole: bool, yielded: bool) -> None:
        """An epoch read whole without a step: every later one would be as empty."""
        if whole and not yielded:
            raise BadDataError(
                f"epoch {epoch} of the training data gave no batch to train on "
                f"({len(self.data.pairs)} samples, "
                f"data.batch_size={self.data.cfg.data.batch_size}; "
                f"{self.bad_data.summary()}); lower data.batch_size or add data"
            )

    def _agreed(self, tensors: dict) -> GlobalBatch:
        """One exchange for the batch: the counts every rank keeps (and rank 0 checkpoints)
        are those of the global batch, and the ranks stop at the same step."""
        ids, skipped = tensors["ids"], tensors.pop("skipped")
        reasons = Counter(bad.reason for bad in skipped)
        local = [len(ids), int(self.stop()), *(reasons[reason] for reason in REASONS)]
        rows = distributed.all_gather_ints(local + self.sources.of(ids, skipped), self.device)
        summed = [sum(column) for column in zip(*rows, strict=True)]
        bad = dict(zip(REASONS, summed[2 : 2 + len(REASONS)], strict=True))
        named = []
        if sum(bad.values()) and self.bad_data.naming:  # every rank decides alike
            named = [s for share in distributed.all_gather_objects(skipped) for s in share]
        counts = [row[0] for row in rows]
        self.bad_data.record_counts(sum(counts), Counter(bad), named)
        self.sources.record(summed[2 + len(REASONS) :])
        return GlobalBatch(tensors, counts, bool(summed[1]))
