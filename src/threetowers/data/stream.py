"""The training data as one endless stream of global batches, resumable from its position.

:class:`BatchStream` reads epoch after epoch of this rank's batches
(``TrainingData.batches``) from a :class:`Position`, which it advances and a checkpoint
saves. Each batch is agreed on by the ranks in one exchange: every rank's sample count, all
ranks' bad samples (into the ``BadSampleLog``) and samples by source, and whether any rank
was asked to stop. A batch of which some rank holds no sample is counted and passed over,
so the ranks move together; every other batch is yielded, to be one step. An epoch read
whole without one is an error, not a hang.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from threetowers import distributed
from threetowers.data.pipeline import TrainingData
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog
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

    tensors: dict  # the prepared share (``TrainingData.batches``), its bad samples taken out
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
    ) -> None:
        self.data, self.position, self.bad_data, self.sources = data, position, bad_data, sources
        self.stop = stop  # polled at each batch and agreed on in its exchange

    def __iter__(self) -> Iterator[GlobalBatch]:
        while True:
            yield from self._rest_of_epoch()
            self.position.epoch, self.position.batch_in_epoch = self.position.epoch + 1, 0

    def _rest_of_epoch(self) -> Iterator[GlobalBatch]:
        at = self.position
        whole, yielded = at.batch_in_epoch == 0, False
        for tensors in self.data.batches(at.epoch, at.batch_in_epoch):
            batch = self._agreed(tensors)
            at.batch_in_epoch += 1
            if min(batch.counts) == 0:  # some rank has nothing left: no step
                if sum(batch.counts):
                    log.warning(
                        "batch %d of epoch %d: a rank's share held only bad samples, so the "
                        "other ranks' %d samples were not trained on",
                        at.batch_in_epoch - 1,
                        at.epoch,
                        sum(batch.counts),
                    )
                continue
            yielded = True
            yield batch
        if whole and not yielded:  # else: empty epochs for ever
            raise BadDataError(
                f"epoch {at.epoch} of the training data gave no batch to train on "
                f"({len(self.data.pairs)} samples, "
                f"data.batch_size={self.data.cfg.data.batch_size}; "
                f"{self.bad_data.summary()}); lower data.batch_size or add data"
            )

    def _agreed(self, tensors: dict) -> GlobalBatch:
        """One exchange for the batch: the counts every rank keeps (and rank 0 checkpoints)
        are those of the global batch, and the ranks stop at the same step."""
        ids, skipped = tensors["ids"], tensors.pop("skipped")
        shares = distributed.all_gather_objects(
            (len(ids), skipped, self.stop(), self.sources.of(ids))
        )
        counts = [count for count, *_ in shares]
        bad = [sample for _, share, *_ in shares for sample in share]
        self.bad_data.record(sum(counts), bad)
        self.sources.record([drawn for *_, drawn in shares], bad)
        return GlobalBatch(tensors, counts, any(stop for *_, stop, _ in shares))
