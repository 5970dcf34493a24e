"""Training-data throughput: read, decode, resize, tokenise and normalise, as training does.

Runs the real ``TrainingData`` pipeline over the config's pairs (the embedded world by
default) with h's features left out, so it measures what every mode pays per pair.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import threetowers as tt
from threetowers.config import Config
from threetowers.data.pipeline import TrainingData, open_data
from threetowers.project.world.default import default_world
from threetowers.trainer.start import towers_of


def pairs_per_second(cfg: Config, num_workers: int, batches: int, repeats: int = 3) -> float:
    """Median pairs/s over ``repeats`` passes of ``batches`` batches, after each pass's first
    batch (worker start-up is a one-off cost, not throughput)."""
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"mode": "clip"}),
            "data": cfg.data.model_copy(update={"num_workers": num_workers, "preload": False}),
        }
    )
    model = tt.build_model(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        opened = open_data(cfg, Path(run_dir), default_world(cfg))
        data = TrainingData(cfg, opened, towers_of(model), progress=False)
        rates = []
        for epoch in range(repeats):
            stream = data.batches(epoch, start_batch=0)
            next(stream)
            start = time.perf_counter()
            count = sum(len(b["ids"]) for b in itertools.islice(stream, batches))
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)
