"""``python short_timeouts.py ARGS``: the ``threetowers`` command, with the training process
group's timeout ``$TRAINING_TIMEOUT_S`` seconds instead of minutes, and where set:

- ``$SLOW_EVALUATION_S``: rank 0's first evaluation takes that many seconds longer;
- ``$SLOW_CHECKPOINT_S``: rank 0's first checkpoint write takes that many seconds longer;
- ``$HANG_AT_STEP`` and ``$HANG_S``: rank 1 hangs ``$HANG_S`` seconds in that step (a lost
  or hung rank).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from datetime import timedelta

from threetowers import distributed
from threetowers.cli import main
from threetowers.trainer import loop
from threetowers.trainer.step import TrainStep


def _slow_the_first_call(function, seconds: float):
    calls = []

    @functools.wraps(function)
    def slowed(*args, **kwargs):
        if not calls:
            time.sleep(seconds)
        calls.append(1)
        return function(*args, **kwargs)

    return slowed


def _hang_at(step: int, seconds: float):
    train_step = TrainStep.__call__
    calls = []

    def hanging(self, batch):
        calls.append(1)
        if len(calls) == step:
            time.sleep(seconds)
        return train_step(self, batch)

    return hanging


if __name__ == "__main__":
    # read when train() joins the process group, after the command line is parsed
    distributed.TIMEOUT = timedelta(seconds=float(os.environ["TRAINING_TIMEOUT_S"]))
    rank = os.environ.get("RANK")
    if rank == "0" and "SLOW_EVALUATION_S" in os.environ:
        seconds = float(os.environ["SLOW_EVALUATION_S"])
        loop._evaluate_on_rank_0 = _slow_the_first_call(loop._evaluate_on_rank_0, seconds)
    if rank == "0" and "SLOW_CHECKPOINT_S" in os.environ:
        seconds = float(os.environ["SLOW_CHECKPOINT_S"])
        loop.save_checkpoint = _slow_the_first_call(loop.save_checkpoint, seconds)
    if rank == "1" and "HANG_AT_STEP" in os.environ:
        TrainStep.__call__ = _hang_at(int(os.environ["HANG_AT_STEP"]), float(os.environ["HANG_S"]))
    sys.exit(main(sys.argv[1:]))
