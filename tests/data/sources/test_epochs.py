"""data/sources/epochs.py: one loader across epochs gives each epoch's batches exactly as a
loader made for that epoch does (``pair_batches``), from any start, for every rank, worker
count, table or shards, resampled or not; its workers persist from epoch to epoch."""

from __future__ import annotations

import itertools

import pytest

from tests.helpers.shards import Probe, assert_same, run
from threetowers.data.sources.epochs import pair_stream
from threetowers.data.sources.loader import num_batches
from threetowers.data.sources.plan import Resampled

EPOCHS = 3


def streamed(source, epoch=0, start_batch=0, **options):
    """Three epochs of the stream from (epoch, start_batch), grouped by epoch."""
    stream = pair_stream(
        source,
        example=Probe(),
        batch_size=4,
        seed=3,
        epoch=epoch,
        start_batch=start_batch,
        **options,
    )
    taken = list(itertools.takewhile(lambda item: item[0] < epoch + EPOCHS, stream))
    stream.close()
    return {
        e: [(i, b) for _, i, b in group] for e, group in itertools.groupby(taken, lambda t: t[0])
    }


def per_epoch(source, epoch, start_batch=0, world_size=1, **options):
    """``pair_batches`` of one epoch, cut like training to the least rank's count."""
    batches = run(source, epoch=epoch, start_batch=start_batch, world_size=world_size, **options)
    least = min(
        num_batches(
            source,
            batch_size=4,
            seed=3,
            epoch=epoch,
            world_size=world_size,
            **{k: v for k, v in (options | {"rank": r}).items() if k != "shuffle_buffer"},
        )
        for r in range(world_size)
    )
    return batches[: max(0, least - start_batch)]


@pytest.mark.parametrize(
    "world, rank, workers", [(1, 0, 0), (1, 0, 2), (1, 0, 3), (2, 0, 2), (2, 1, 1), (3, 2, 1)]
)
@pytest.mark.parametrize("start", [(0, 0), (1, 3), (0, 1), (2, 0)])
def test_each_epoch_equals_a_loader_made_for_it(shards, tables, world, rank, workers, start):
    epoch, start_batch = start
    options = dict(world_size=world, rank=rank, num_workers=workers)
    for source in (shards, tables / "pairs.csv"):
        got = streamed(source, epoch, start_batch, **options)
        for e in range(epoch, epoch + EPOCHS):  # the first may hold none after start_batch
            first = start_batch if e == epoch else 0
            expected = per_epoch(source, e, first, **options)
            assert [index for index, _ in got.get(e, [])] == list(
                range(first, first + len(expected))
            )
            assert_same([batch for _, batch in got.get(e, [])], expected)
        assert set(got) <= set(range(epoch, epoch + EPOCHS)) and epoch + 1 in got


def test_resampled_epochs_equal_their_own_loaders(shards):
    resampled = Resampled((1.0, 2.0, 0.5, 1.0, 1.0, 3.0))
    options = dict(num_workers=2, resampled=resampled)
    got = streamed(shards, 1, 2, **options)
    for e in got:
        assert_same([b for _, b in got[e]], per_epoch(shards, e, 2 if e == 1 else 0, **options))


def test_the_workers_persist_from_epoch_to_epoch(shards):
    import os

    class Pid(Probe):
        def __call__(self, pair, rng):
            import torch

            return super().__call__(pair, rng) | {"pid": torch.tensor(os.getpid())}

    stream = pair_stream(shards, example=Pid(), batch_size=4, seed=3, epoch=0, num_workers=2)
    pids = {}
    for epoch, _, batch in itertools.islice(stream, 30):
        pids.setdefault(epoch, set()).update(batch["pid"].tolist())
    stream.close()
    assert len(pids) >= 3 and len(set.union(*pids.values())) == 2  # the same two processes


def test_the_stream_ends_at_an_epoch_without_a_batch(shards):
    stream = pair_stream(shards, example=Probe(), batch_size=1000, seed=3, epoch=0)
    assert list(stream) == []


def _state(pid: int) -> str:
    """A process's state letter (Z: exited, not yet reaped), '' when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def test_sigterm_ends_a_worker_only_after_its_grace(shards, monkeypatch):
    """A job's SIGTERM must not kill the workers under the step that checkpoints, nor may a
    worker that nobody shuts down block its process's exit for ever."""
    import os
    import signal
    import time

    import torch

    from threetowers.data.sources import workers

    class Pid(Probe):
        def __call__(self, pair, rng):
            return super().__call__(pair, rng) | {"pid": torch.tensor(os.getpid())}

    monkeypatch.setattr(workers, "SIGTERM_GRACE_S", 2)
    stream = pair_stream(shards, example=Pid(), batch_size=4, seed=3, epoch=0, num_workers=2)
    pid = int(next(stream)[2]["pid"][0])
    os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    assert _state(pid) not in ("", "Z")  # still serving
    with pytest.raises(RuntimeError, match="killed by signal: Alarm clock"):
        time.sleep(3)  # the DataLoader reports its worker's end at once
    assert _state(pid) in ("", "Z")
    stream.close()
