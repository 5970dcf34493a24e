"""data/sources/shards.py on local tar shards: what a source of shards refuses, each shard's
size and first row, the epoch's shard order, raw samples carrying their rows, and one raw
sample decoded to a Pair or the reason it is bad (captions by fields: test_fields.py; remote
shards: test_remote.py; parquet files: test_parquet_samples.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.shards import png, write_shards
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.shards import (
    ShardPairs,
    decode_sample,
    sample_captions,
    shard_sample_id,
    shard_samples,
)
from threetowers.errors import UserError

SIZES = [3, 5, 2, 4]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = write_shards(tmp_path_factory.mktemp("shards") / "s", SIZES)
    return sorted(folder.glob("*.tar"))


def test_sizes_and_first_rows_number_the_samples_in_the_order_given(shards):
    pairs = ShardPairs(shards)
    assert pairs.sizes == SIZES and len(pairs) == sum(SIZES)
    assert pairs.first_rows == [0, 3, 8, 10]
    backwards = ShardPairs(shards[::-1])
    assert backwards.sizes == SIZES[::-1] and backwards.first_rows == [0, 4, 6, 11]


def test_raw_samples_carry_their_row_and_their_shards_path(shards):
    pairs = ShardPairs(shards)
    samples = list(shard_samples(pairs.shards, pairs.first_rows))
    assert [s["__row__"] for s in samples] == list(range(sum(SIZES)))
    assert [s["__key__"] for s in samples] == [f"k{i:04d}" for i in range(sum(SIZES))]
    assert shard_sample_id(samples[4]) == f"{shards[1]}/k0004"
    assert all("__row__" not in s for s in shard_samples(shards[:1]))


def test_the_shard_order_is_a_permutation_fixed_by_seed_and_epoch(shards):
    pairs = ShardPairs(shards)
    draws = [(seed, epoch) for seed in range(3) for epoch in range(4)]
    orders = {draw: pairs.shard_order(*draw) for draw in draws}
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders.values())
    assert ShardPairs(shards).shard_order(1, 2) == orders[(1, 2)]  # any rank, any process
    assert len({tuple(order) for order in orders.values()}) > 6  # 12 draws of 24 orders
    with pytest.raises(UserError, match="non-negative"):
        pairs.shard_order(0, -1)


def test_a_source_of_shards_refuses_what_it_cannot_read_as_one(shards, tmp_path):
    with pytest.raises(UserError, match="no shards given"):
        ShardPairs([])
    with pytest.raises(FileNotFoundError, match="1 of 2 shards not found"):
        ShardPairs([shards[0], tmp_path / "gone.tar"])
    with pytest.raises(UserError, match="shards listed more than once"):
        ShardPairs([shards[0], shards[1], shards[0]])
    table = pa.table({"image": [png(1)], "caption": ["c"]})
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(UserError, match="either webdataset shards or parquet files, not both"):
        ShardPairs([shards[0], tmp_path / "p.parquet"])


def raw(key="k1", **members):
    return {"__key__": key, "__url__": "data/s-000.tar", **members}


def test_a_raw_sample_decodes_to_a_pair_named_by_shard_and_key():
    pair = decode_sample(raw(png=png(7), txt=b" a caption ", __row__=41))
    assert (pair.key, pair.id, pair.row) == ("k1", "data/s-000.tar/k1", 41)
    assert pair.captions == ["a caption"] and pair.image.getpixel((0, 0)) == (7, 17, 200)
    assert decode_sample(raw(png=png(1), txt=b"c")).row == -1


def test_damaged_metadata_leaves_the_other_members_to_serve():
    pair = decode_sample(raw(png=png(2), txt=b"from txt", json=b"{not json"))
    assert pair.captions == ["from txt"]
    listed = raw(png=png(2), txt=b"t", json=json.dumps(["not", "an", "object"]).encode())
    assert sample_captions(listed) == ["t"]


@pytest.mark.parametrize(
    "sample,reason,detail",
    [
        (raw(txt=b"no image"), "no_image", "sample 'k1' of data/s-000.tar: no ."),
        (raw(png=png(1)), "no_caption", "sample 'k1' of data/s-000.tar: no .txt"),
        (raw("caf\udce9", png=png(1), txt=b"c"), "malformed_row", "the key is not UTF-8"),
        (raw(png=b"broken", txt=b"c"), "undecodable_image", "sample 'k1' of data/s-000.tar"),
        (raw(__bad__=("truncated_shard", "cut short")), "truncated_shard", "cut short"),
    ],
)
def test_a_raw_sample_that_cannot_be_used_says_why(sample, reason, detail):
    with pytest.raises(BadSample) as caught:
        decode_sample(sample)
    assert caught.value.reason == reason and detail in caught.value.detail


def test_the_caption_is_checked_before_the_image_is_decoded():
    """A sample with no caption is refused without decoding its (here broken) image."""
    with pytest.raises(BadSample) as caught:
        decode_sample(raw(png=b"broken", txt=b"   "))
    assert caught.value.reason == "empty_caption"
