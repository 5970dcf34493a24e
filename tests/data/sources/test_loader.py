"""The resumable loader: an epoch planned (which samples, which rank and worker, which
order), then read by the DataLoader's workers; on real webdataset shards and tables."""

from __future__ import annotations

import tarfile

import pytest

from tests.helpers.shards import (
    SHARD_SIZES,
    Probe,
    assert_same,
    check_consistent,
    keys_of,
    run,
    skipped_of,
    write_shards,
)
from threetowers.data.sources.loader import num_batches, pair_batches
from threetowers.data.sources.pairs import open_pairs
from threetowers.data.sources.plan import (
    Resampled,
    TooFewShardsError,
    resume_point,
    round_robin,
    shard_plans,
    source_weights,
)
from threetowers.errors import UserError

from .conftest import N_TABLE

N_SHARD = sum(SHARD_SIZES)


# --------------------------------------------------------------------------- planning


def test_workers_take_turns_and_a_resume_point_counts_each_workers_batches():
    counts = [2, 0, 3]  # worker 1 has nothing; worker 0 runs dry before worker 2
    assert list(round_robin(counts)) == [(0, 0), (2, 0), (0, 1), (2, 1), (2, 2)]
    assert resume_point(counts, 0) == ([0, 0, 0], 0)
    assert resume_point(counts, 3) == ([2, 0, 1], 2)  # worker 2 owes the next batch
    assert resume_point(counts, 5) == ([2, 0, 3], 0)  # the epoch is read


def test_each_source_weighs_its_samples_alike_whatever_its_shard_sizes():
    weights = source_weights([10, 0, 30, 30], [0, 0, 1, 1], [1.0, 3.0])
    assert weights == pytest.approx((1 / 10, 0.0, 3 / 60, 3 / 60))  # an empty shard: never


def test_resampled_plans_depend_on_seed_epoch_rank_and_worker_only(shards):
    source = open_pairs(shards)
    uniform = Resampled((1.0,) * len(source.shards))

    def plans(seed=0, epoch=0, rank=0):
        planned = shard_plans(source, 4, seed, epoch, rank, 2, 2, True, uniform)
        return [plan.shards for plan in planned]

    assert plans() == plans()
    assert plans() != plans(epoch=1) and plans() != plans(seed=1) and plans() != plans(rank=1)
    assert plans()[0] != plans()[1]  # the workers draw apart
    share = -(-len(source) // 4)  # a quarter of one pass each (2 ranks x 2 workers)
    for plan in shard_plans(source, 4, 0, 0, 0, 2, 2, True, uniform):
        assert plan.samples >= share and plan.batches == plan.samples // 4


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 3), (2, 2), (3, 1)])
def test_num_batches_is_what_each_rank_reads(shards, tables, world, workers):
    for source in (shards, tables / "pairs.csv"):
        for rank in range(world):
            options = dict(rank=rank, world_size=world, num_workers=workers, epoch=2)
            planned = num_batches(source, batch_size=4, seed=3, **options)
            assert len(run(source, **options)) == planned


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_visit_every_sample_once(shards, workers):
    batches = run(shards, num_workers=workers, drop_last=False)
    assert sorted(keys_of(batches)) == [f"k{i:04d}" for i in range(N_SHARD)]
    # every sample is named by its shard and its key
    members = {
        f"{shard}/{name.rsplit('.', 1)[0]}"
        for shard in open_pairs(shards).shards
        for name in tarfile.open(shard).getnames()
    }
    assert {sample_id for batch in batches for sample_id in batch["ids"]} < members
    # the caption without an image is a sample, skipped as bad and listed in its batch
    assert skipped_of(batches) == [("orphan", "no_image")]
    check_consistent(batches)
    dropped = run(shards, num_workers=workers)
    keys = keys_of(dropped) + [key for key, _ in skipped_of(dropped)]
    assert len(set(keys)) == len(keys) == 4 * len(dropped)
    expected = num_batches(shards, batch_size=4, seed=3, epoch=0, num_workers=workers)
    assert len(dropped) == expected


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_shards_are_deterministic_and_resume_exactly(shards, workers):
    full = run(shards, num_workers=workers, shuffle_buffer=16)
    assert_same(full, run(shards, num_workers=workers, shuffle_buffer=16))
    # Every resume point, including those after a worker has run dry (uneven shards).
    for start in range(1, len(full) + 2):
        assert_same(
            run(shards, num_workers=workers, shuffle_buffer=16, start_batch=start), full[start:]
        )
    other_epoch = run(shards, num_workers=workers, shuffle_buffer=16, epoch=1)
    assert keys_of(other_epoch) != keys_of(full)


def test_shard_ranks_are_disjoint_and_cover(shards):
    for world, workers in ((2, 0), (3, 2)):
        seen = [
            keys_of(run(shards, rank=r, world_size=world, num_workers=workers, drop_last=False))
            for r in range(world)
        ]
        flat = [key for keys in seen for key in keys]
        assert len(flat) == len(set(flat)) == N_SHARD


def test_too_few_shards_says_what_to_do(shards):
    with pytest.raises(TooFewShardsError) as error:
        pair_batches(
            shards, example=Probe(), batch_size=4, seed=0, epoch=0, world_size=2, num_workers=4
        )
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)
    message = str(error.value)
    assert "6 shards" in message and "2 rank" in message and "4 loader worker" in message
    assert "num_workers (at most 3)" in message


def test_multi_caption_picks_vary_by_epoch_but_repeat(tmp_path):
    folder = write_shards(tmp_path / "multi", [6, 6], captions_per_sample=5)

    def picks(epoch):
        batches = run(folder, epoch=epoch, batch_size=3, num_workers=0)
        check_consistent(batches)
        pairs = [zip(b["ids"], b["caption"], strict=True) for b in batches]
        return {key: int(caption[1]) for batch in pairs for key, caption in batch}

    per_epoch = [picks(epoch) for epoch in range(6)]
    assert picks(2) == per_epoch[2]
    assert all(len(p) == 12 for p in per_epoch)
    varied = sum(len({p[key] for p in per_epoch}) > 1 for key in per_epoch[0])
    assert varied >= 10


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.jsonl"])
@pytest.mark.parametrize("workers", [0, 2])
def test_tables_visit_every_sample_once(tables, name, workers):
    batches = run(tables / name, num_workers=workers, drop_last=False)
    assert len(keys_of(batches)) == len(set(keys_of(batches))) == N_TABLE
    check_consistent(batches)
    assert [len(b["ids"]) for b in batches] == [4] * 5 + [2]
    assert len(run(tables / name, num_workers=workers)) == 5


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.jsonl"])
def test_tables_are_deterministic_and_resume_exactly(tables, name):
    full = run(tables / name, epoch=1)
    assert_same(full, run(tables / name, epoch=1))
    assert_same(run(tables / name, epoch=1, num_workers=2), full)  # workers do not matter
    for start in (1, 3, 5, 9):
        assert_same(run(tables / name, epoch=1, start_batch=start), full[start:])
    assert_same(run(tables / name, epoch=1, start_batch=2, num_workers=2), full[2:])
    assert keys_of(run(tables / name, epoch=2)) != keys_of(full)


def test_table_ranks_are_disjoint_and_cover(tables):
    seen = [
        keys_of(run(tables / "pairs.csv", rank=r, world_size=3, drop_last=False)) for r in range(3)
    ]
    flat = [key for keys in seen for key in keys]
    assert len(flat) == len(set(flat)) == N_TABLE
    equal = [len(run(tables / "pairs.csv", rank=r, world_size=3, batch_size=2)) for r in range(3)]
    assert equal == [3, 3, 3]  # 22 // 3 = 7 samples each, 3 whole batches of 2
