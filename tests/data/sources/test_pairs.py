"""Pair sources and the resumable loader, on CSV/JSONL tables and real webdataset shards."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from tests.helpers.shards import (
    SHARD_SIZES,
    Probe,
    assert_same,
    check_consistent,
    keys_of,
    png,
    run,
    skipped_of,
    write_shards,
)
from threetowers.data.sources.fields import Fields
from threetowers.data.sources.loader import num_batches, pair_batches
from threetowers.data.sources.pairs import epoch_size, open_pairs
from threetowers.data.sources.shards import ShardPairs, count_shard_samples
from threetowers.data.sources.table import PairTable

N_SHARD = sum(SHARD_SIZES)
N_TABLE = 22


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wds") / "shards", SHARD_SIZES, stray=True)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    (root / "images").mkdir()
    for index in range(N_TABLE):
        (root / "images" / f"{index}.png").write_bytes(png(index))
    csv_lines = ["image,caption"] + [f'images/{i}.png,"caption {i}"' for i in range(N_TABLE)]
    (root / "pairs.csv").write_text("\n".join(csv_lines) + "\n")
    tsv_lines = ["file\ttext"] + [f"images/{i}.png\tcaption {i}" for i in range(N_TABLE)]
    (root / "pairs.tsv").write_text("\n".join(tsv_lines) + "\n")
    with open(root / "pairs.jsonl", "w") as handle:
        for i in range(N_TABLE):
            record = {"image": f"images/{i}.png", "key": f"j{i}"}
            if i % 2:
                record["captions"] = [f"caption {i} {j}" for j in range(3)]
            else:
                record["caption"] = f"caption {i}"
            handle.write(json.dumps(record) + "\n\n")
    return root


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
    with pytest.raises(ValueError) as error:
        pair_batches(
            shards, example=Probe(), batch_size=4, seed=0, epoch=0, world_size=2, num_workers=4
        )
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


def test_shard_sizes_come_from_headers(shards):
    source = open_pairs(shards)
    with_orphan = SHARD_SIZES[:1] + [SHARD_SIZES[1] + 1] + SHARD_SIZES[2:]
    assert isinstance(source, ShardPairs) and source.sizes == with_orphan
    assert epoch_size(shards) == N_SHARD + 1  # the image-less "orphan" is a (bad) sample
    assert count_shard_samples(source.shards[1]) == 8


def test_shard_sources_open_in_every_spelling(shards):
    pattern = str(shards / "train-{000000..000005}.tar")
    listed = [str(p) for p in sorted(shards.glob("*.tar"))]
    for spelling in (shards, str(shards), pattern, listed, listed[0]):
        assert isinstance(open_pairs(spelling), ShardPairs)
    assert len(open_pairs(pattern).shards) == 6
    with pytest.raises(FileNotFoundError, match="1 of 7 shards not found"):
        open_pairs(listed + [str(shards / "train-000099.tar")])
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        open_pairs(shards.parent)


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


def test_table_reading(tables):
    csv_table = open_pairs(tables / "pairs.csv")
    assert isinstance(csv_table, PairTable) and epoch_size(csv_table) == N_TABLE
    assert csv_table.images[1] == tables / "images/1.png"
    pair = csv_table[5]
    assert pair.image.mode == "RGB" and pair.image.getpixel((0, 0))[0] == 5
    assert pair.captions == ["caption 5"]
    tsv = open_pairs(tables / "pairs.tsv", fields=Fields("file", "text"))
    assert tsv[7].captions == ["caption 7"]
    jsonl = open_pairs(tables / "pairs.jsonl")
    assert jsonl.keys[3] == "j3" and jsonl[3].captions == [f"caption 3 {j}" for j in range(3)]
    assert not np.array_equal(jsonl.order(0, 0), jsonl.order(0, 1))


def test_table_errors(tables, tmp_path):
    with pytest.raises(ValueError, match="no column 'image'"):
        open_pairs(tables / "pairs.tsv")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        open_pairs(tmp_path / "missing.csv")
    unknown = tmp_path / "pairs.feather"  # (.parquet is a source now: test_parquet.py)
    unknown.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown pairs format"):
        open_pairs(unknown)
    broken = tmp_path / "broken.csv"
    broken.write_text("image,caption\nnowhere.png,hello\n")
    (batch,) = run(broken, batch_size=1)
    assert batch["ids"] == [] and skipped_of([batch]) == [("000000000", "missing_file")]
    assert "nowhere.png" in batch["skipped"][0].detail


def test_tsv_keeps_bare_quotes(tables, tmp_path):
    path = tmp_path / "quotes.tsv"
    image = tables / "images" / "1.png"
    path.write_text(f'image\tcaption\tkey\n{image}\ta "so-called" cube\tq1\n')
    table = open_pairs(path, allow_absolute_paths=True)
    assert table.keys == ["q1"] and table.captions == [['a "so-called" cube']]
