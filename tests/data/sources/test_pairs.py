"""Pair sources, on CSV/JSONL tables and real webdataset shards (the loader that reads
them: test_loader.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.shards import (
    SHARD_SIZES,
    png,
    run,
    skipped_of,
)
from threetowers.data.sources.fields import Fields
from threetowers.data.sources.pair import check_seed
from threetowers.data.sources.pairs import epoch_size, open_pairs
from threetowers.data.sources.shards import ShardPairs, count_shard_samples
from threetowers.data.sources.table import PairTable
from threetowers.errors import UserError

N_SHARD = sum(SHARD_SIZES)
N_TABLE = 22


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
    unknown = tmp_path / "pairs.feather"  # (.parquet is a source now: test_parquet_samples.py)
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


def test_a_source_that_cannot_be_read_as_given_is_a_user_error(tables, tmp_path):
    unknown = tmp_path / "pairs.feather"
    unknown.write_bytes(b"")
    with pytest.raises(UserError, match="unknown pairs format"):
        open_pairs(unknown)
    with pytest.raises(UserError, match="a list source must hold .tar shards or .parquet"):
        open_pairs([tables / "pairs.csv"])
    with pytest.raises(UserError, match="no column 'image'"):
        open_pairs(tables / "pairs.tsv")
    twice = tmp_path / "twice.csv"
    twice.write_text("image,caption,key\na.png,one,000000001\nb.png,two,\n")  # 2nd: row 1's
    with pytest.raises(UserError, match="duplicate keys, e.g. \\['000000001'\\]"):
        open_pairs(twice)
    columns = tmp_path / "columns.parquet"
    pq.write_table(pa.table({"text": ["one"]}), columns)
    with pytest.raises(UserError, match="no image column 'image'"):
        open_pairs(columns)
    with pytest.raises(UserError, match="seed and epoch must be non-negative"):
        check_seed(-1, 0)  # train.seed
