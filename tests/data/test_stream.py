"""The endless stream of batches: epochs in order, its position resumed exactly, bad batches
passed over and counted, and an epoch without a single batch one clear error."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from tests.helpers.shards import Probe, png, run
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog
from threetowers.data.sources.epochs import pair_stream
from threetowers.data.sources.mix import SourceCounts
from threetowers.data.sources.pairs import open_pairs
from threetowers.data.stream import BatchStream, Position
from threetowers.data.views import Views
from threetowers.errors import UserError

BATCH = 4


def write_table(folder, images: int, missing: int = 0):
    """A CSV of ``images`` pairs, then ``missing`` rows whose image file is not there."""
    folder.mkdir()
    lines = ["image,caption"]
    for index in range(images):
        (folder / f"{index}.png").write_bytes(png(index))
        lines.append(f"{index}.png,caption {index}")
    lines += [f"gone{index}.png,caption {index}" for index in range(missing)]
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


class Data:
    """What the stream reads of ``TrainingData``: an epoch's batches from a start, the pairs,
    the batch size and the views to normalise (none: the probe's fields are not images)."""

    def __init__(self, pairs, batch_size: int = BATCH) -> None:
        self.pairs, self.views = open_pairs(pairs), Views()
        self.cfg = SimpleNamespace(data=SimpleNamespace(batch_size=batch_size))

    def stream(self, epoch: int, start_batch: int, pin_memory: bool = False):
        stream = pair_stream(
            self.pairs,
            example=Probe(),
            batch_size=self.cfg.data.batch_size,
            seed=3,
            epoch=epoch,
            start_batch=start_batch,
        )
        for at_epoch, index, batch in stream:
            yield batch | {"position": (at_epoch, index)}


def stream_of(data: Data, position: Position | None = None) -> BatchStream:
    bad = BadSampleLog(1.0, "training data", size=len(data.pairs))
    return BatchStream(data, position or Position(), bad, SourceCounts(None))


def taken(stream: BatchStream, steps: int) -> list[tuple[list[str], Position]]:
    """The first ``steps`` batches' sample ids, each with the position after it."""
    out = []
    for _, batch in zip(range(steps), stream, strict=False):
        out.append((batch.tensors["ids"], Position(**vars(stream.position))))
    return out


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("stream") / "pairs", 10)  # 2 batches an epoch


def test_epochs_follow_each_other_and_the_position_names_the_next_batch(table):
    got = taken(stream_of(Data(table)), 7)
    epochs = [run(table, epoch=epoch, batch_size=BATCH) for epoch in range(4)]
    assert [ids for ids, _ in got] == [batch["ids"] for epoch in epochs for batch in epoch][:7]
    # an epoch's end is left only when the next batch is asked for
    assert [(p.epoch, p.batch_in_epoch) for _, p in got] == [
        (0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1)
    ]  # fmt: skip


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_a_stream_resumed_from_a_saved_position_continues_exactly(table, steps):
    straight = taken(stream_of(Data(table)), 7)
    saved = straight[steps - 1][1]
    resumed = taken(stream_of(Data(table), Position(saved.epoch, saved.batch_in_epoch)), 7 - steps)
    assert resumed == straight[steps:]


def test_a_batch_of_only_bad_samples_is_counted_and_passed_over(tmp_path):
    # one good sample and three bad ones in batches of one: an epoch is one step
    pairs = write_table(tmp_path / "pairs", 1, missing=3)
    stream = stream_of(Data(pairs, batch_size=1))
    batches = iter(stream)
    for epoch in range(3):
        planned = run(pairs, epoch=epoch, batch_size=1)
        good = next(i for i, batch in enumerate(planned) if batch["ids"])
        batch = next(batches)
        assert batch.tensors["ids"] == ["000000000"] and batch.counts == [1]
        assert "skipped" not in batch.tensors
        assert (stream.position.epoch, stream.position.batch_in_epoch) == (epoch, good + 1)
        # the bad batches of the epoch so far, and those the last epoch ended with
        assert stream.bad_data.total == 3 * epoch + good


@pytest.mark.parametrize("case", ["smaller_than_a_batch", "all_bad"])
def test_an_epoch_without_a_batch_is_one_clear_error(tmp_path, case):
    pairs = write_table(tmp_path / "pairs", *((3, 0) if case == "smaller_than_a_batch" else (0, 6)))
    with pytest.raises(BadDataError) as error:
        next(iter(stream_of(Data(pairs))))
    assert isinstance(error.value, UserError)
    samples = 3 if case == "smaller_than_a_batch" else 6
    message = str(error.value)
    assert message.startswith(
        f"epoch 0 of the training data gave no batch to train on ({samples} samples, "
        f"data.batch_size={BATCH}; "
    )
    assert message.endswith("); lower data.batch_size or add data")


def test_a_resume_at_the_end_of_an_epoch_is_no_error(table):
    # the position a checkpoint at an epoch's last batch saves: nothing left of epoch 0
    stream = stream_of(Data(table), Position(0, 2))
    first = next(iter(stream))
    assert first.tensors["ids"] == run(table, epoch=1, batch_size=BATCH)[0]["ids"]
    assert (stream.position.epoch, stream.position.batch_in_epoch) == (1, 1)


def test_a_stop_request_reaches_the_batch_it_was_made_before(table):
    requests = itertools.chain([False, True], itertools.repeat(False))
    bad = BadSampleLog(1.0, "training data")
    stream = BatchStream(Data(table), Position(), bad, SourceCounts(None), lambda: next(requests))
    assert [batch.stop for _, batch in zip(range(3), stream, strict=False)] == [False, True, False]
