"""What a resume restores besides the weights, in one object, and when periodic actions run.

:class:`TrainingState` holds the optimizer, the schedule, the data position, the torch RNG
and the counts of bad samples, skipped steps and samples by source; its ``state_dict`` is a
checkpoint's ``state.pt`` (the keys every earlier checkpoint has; the data position as the
flat ``epoch`` and ``batch_in_epoch``) and ``load_state_dict`` puts all of it back.
:func:`due` is the one rule for "is it time" (log, checkpoint, evaluate).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from threetowers import distributed
from threetowers.data.sources.bad_samples import BadSampleLog
from threetowers.data.sources.mix import SourceCounts
from threetowers.data.stream import Position
from threetowers.errors import UserError

log = logging.getLogger(__name__)


def due(step: int, every: int, last: int | None = None) -> bool:
    """Whether an action run every ``every`` steps (0: never) runs after ``step``; with
    ``last``, also after the last step."""
    return (every > 0 and step % every == 0) or step == last


class NonFiniteError(UserError, FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class StepHealth:
    """Skipped (non-finite) steps: in total, and in a row; ``limit`` in a row stop the run."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def update(self, finite: bool, step: int, logs: dict, last_checkpoint: Path | None) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        values = {k: float(logs[k]) for k in ("loss", "grad_norm") if k in logs}
        log.warning(
            "step %d: non-finite %s; update skipped (%d in a row)", step, values, self.in_a_row
        )
        if self.in_a_row >= self.limit:
            kept = (
                f"the last checkpoint, {last_checkpoint}, is intact"
                if last_checkpoint
                else "no checkpoint was written yet"
            )
            raise NonFiniteError(
                f"training stopped at step {step}: {self.in_a_row} steps in a row had a "
                f"non-finite loss or gradient ({values}); their updates were skipped and "
                f"{kept}. Lower train.lr or set train.grad_clip, check the data, or raise "
                f"train.max_bad_steps (now {self.limit})"
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.skipped = int(state["in_a_row"]), int(state["skipped"])


class TrainingState:
    """The position of a run and everything it carries from step to step but the weights."""

    def __init__(
        self,
        optimizer,
        schedule,
        bad_data: BadSampleLog,
        health: StepHealth,
        sources: SourceCounts | None = None,
    ) -> None:
        self.optimizer, self.schedule = optimizer, schedule
        self.bad_data, self.health = bad_data, health
        self.sources = sources or SourceCounts(None)
        self.step = 0
        self.position = Position()  # the data's, which the run's BatchStream advances

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": torch.get_rng_state(),
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "bad_samples": self.bad_data.state_dict(),
            "health": self.health.state_dict(),
            "sources": self.sources.state_dict(),
            # the data position and each rank's share of a batch follow the number of ranks
            "world_size": distributed.world_size(),
        }

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Restore ``state`` (a checkpoint's, written after ``step``)."""
        if "optimizer" in state:  # a sharded run's is restored from its shards
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if "bad_samples" in state:  # older checkpoints have no counts: they start from zero
            self.bad_data.load_state_dict(state["bad_samples"])
            self.health.load_state_dict(state["health"])
        if "sources" in state:  # likewise the counts by source
            self.sources.load_state_dict(state["sources"])
        self.step = step
        self.position.epoch = state["epoch"]  # in place: the stream reads this position
        self.position.batch_in_epoch = state["batch_in_epoch"]
