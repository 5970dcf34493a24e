"""The tokenizer's captions: every caption, in today's order, up to the bound; above it a
fixed sample of whole shards (a table's rows) that reads no further."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from tests.helpers.bad_data import small_shard, write_mixed_shards
from tests.helpers.shards import SHARD_SIZES, png, write_shards
from tests.helpers.tar_members import good, hostile, write_shard
from threetowers.data.sources import shards as shards_module
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.caption_sample import caption_sample, read_order
from threetowers.data.sources.fields import Fields
from threetowers.data.sources.pairs import iter_captions, open_pairs
from threetowers.data.sources.parquet_samples import is_parquet
from threetowers.data.sources.parquet_samples import read_samples as read_parquet
from threetowers.data.sources.shards import sample_captions
from threetowers.data.sources.table import PairTable
from threetowers.data.sources.tar_samples import read_samples as read_tar


def whole_read_captions(pairs) -> list[str]:
    """The captions iter_captions gave before it read caption members only: every shard read
    whole, shard after shard, each sample's captions or none when it is bad."""
    if isinstance(pairs, PairTable):
        return list(iter_captions(pairs))  # a table's rows are in memory: that path is as it was
    out = []
    for shard in pairs.shards:
        samples = read_parquet(shard, None) if is_parquet(shard) else read_tar(shard)
        for sample in samples:
            try:
                out += sample_captions(sample, pairs.fields)
            except BadSample:
                pass
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Shard sets and a table, by name: (source, fields)."""
    root = tmp_path_factory.mktemp("caption_sets")
    plain = write_shards(root / "plain", SHARD_SIZES, stray=True)
    listed = write_shards(root / "listed", [3, 4, 2], captions_per_sample=3)
    mixed = write_mixed_shards(root / "mixed")
    hostile_shards = [
        write_shard(root / f"hostile-{kind}.tar", good("a"), *hostile(kind), good("b"))
        for kind in ("caption", "json", "image")
    ]
    data, whole = small_shard(root / "small.tar", samples=4)
    cut = []
    for end in range(0, whole, 211):
        cut.append(root / f"cut-{end:05d}.tar")
        cut[-1].write_bytes(data[:end])
    keyed = root / "keyed.tar"
    with wds.TarWriter(str(keyed)) as sink:
        for i in range(4):
            meta = {"caption": f"json {i}", "title": [f"title {i} a", f"title {i} b"]}
            sink.write({"__key__": f"s{i}", "png": png(i), "txt": f"t {i}", "json": meta})
    parquet = root / "parquet"
    parquet.mkdir()
    for number in range(3):
        captions = [f"row {number} {i}" for i in range(5)]
        table = pa.table({"image": [png(i) for i in range(5)], "caption": captions})
        pq.write_table(table, parquet / f"train-{number}.parquet", row_group_size=2)
    (root / "images").mkdir()
    lines = ["image,caption"]
    for i in range(9):
        (root / "images" / f"{i}.png").write_bytes(png(i))
        lines.append(f"images/{i}.png,{'' if i == 4 else f'caption {i}'}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return {
        "plain": (plain, Fields()),
        "listed": (listed, Fields()),
        "mixed": (mixed, Fields()),
        "hostile_and_cut": ([*map(str, hostile_shards), *map(str, cut)], Fields()),
        "keyed_json": (keyed, Fields()),
        "keyed_title": (keyed, Fields(caption="title")),
        "parquet": (parquet, Fields()),
        "table": (root / "pairs.csv", Fields()),
    }


NAMES = ["plain", "listed", "mixed", "hostile_and_cut", "keyed_json", "keyed_title"]


@pytest.mark.parametrize("name", [*NAMES, "parquet", "table"])
def test_up_to_the_bound_every_caption_in_the_order_of_a_whole_read(sets, name):
    source, fields = sets[name]
    pairs = open_pairs(source, fields=fields)
    expected = whole_read_captions(pairs)
    assert expected  # each set has captions to compare
    assert list(iter_captions(pairs)) == expected
    for bound in (len(expected), len(expected) + 1, 10**9):
        sample = caption_sample(pairs, bound)
        assert sample.captions == expected
        assert sample.every_caption and sample.parts_read == sample.parts


def test_a_known_dataset_gives_its_known_captions(sets):
    pairs = open_pairs(sets["plain"][0])
    expected = [f"caption {i}" for i in range(sum(SHARD_SIZES))]
    expected.insert(sum(SHARD_SIZES[:2]), "a caption without an image")  # shard 1's stray
    assert caption_sample(pairs, 10**6).captions == expected
    keyed = open_pairs(sets["keyed_title"][0], fields=Fields(caption="title"))
    titles = [f"title {i} {side}" for i in range(4) for side in "ab"]
    assert caption_sample(keyed, 100).captions == titles


def shard_of(caption: str) -> int:
    """The shard of a caption of the plain set (``caption INDEX``)."""
    index = int(caption.split()[1])
    return next(n for n in range(len(SHARD_SIZES)) if index < sum(SHARD_SIZES[: n + 1]))


@pytest.mark.parametrize("bound", [1, 5, 8, 12, 20, 33])
def test_above_the_bound_whole_shards_in_a_fixed_order_and_no_further(sets, monkeypatch, bound):
    folder = sets["plain"][0]
    opened = []

    def spied(path, members=None):
        opened.append(path)
        return read_tar(path, members)

    monkeypatch.setattr(shards_module, "read_samples", spied)
    sample = caption_sample(open_pairs(folder), bound)
    read = read_order(len(SHARD_SIZES))[: sample.parts_read]
    assert opened == [folder / f"train-{n:06d}.tar" for n in read]  # and no other
    held = np.cumsum([SHARD_SIZES[n] + (n == 1) for n in read_order(6)])  # shard 1's stray
    filled = int(np.searchsorted(held, bound)) + 1  # shards that hold the bound's captions
    assert sample.parts_read == filled + (held[filled - 1] == bound)  # one more, to see more
    assert caption_sample(open_pairs(folder), bound) == sample  # same data and bound, same sample
    assert len(sample.captions) == bound and not sample.every_caption
    used = [shard_of(c) for c in sample.captions if c.startswith("caption")]
    assert used == sorted(used)  # the dataset's order
    everything = whole_read_captions(open_pairs(folder))
    for shard in set(used):
        mine = [c for c in sample.captions if c.startswith("caption") and shard_of(c) == shard]
        theirs = [c for c in everything if c.startswith("caption") and shard_of(c) == shard]
        assert mine == theirs[: len(mine)]  # a shard's first captions, in file order
        assert shard in read
    partial = [s for s in set(used) if used.count(s) < SHARD_SIZES[s]]
    assert len(partial) <= 1 and set(partial) <= {read[-1]}
    record = sample.record()
    assert record == {
        "bound": bound,
        "captions": bound,
        "shards": 6,
        "shards_read": sample.parts_read,
        "every_caption": False,
    }
    assert json.dumps(record)  # what the run directory keeps


def test_a_sample_ending_inside_a_samples_captions_keeps_its_first_ones(sets):
    pairs = open_pairs(sets["listed"][0])
    sample = caption_sample(pairs, 4)
    first = read_order(3)[0]
    index = sum([3, 4, 2][:first])  # the shard's first sample
    assert sample.captions == [f"caption {index} {j}" for j in range(3)] + [
        f"caption {index + 1} 0"
    ]
    assert sample.parts_read == 1


def test_a_table_above_the_bound_gives_rows_in_a_fixed_order_put_back_in_table_order(sets):
    table = open_pairs(sets["table"][0])
    sample = caption_sample(table, 5)
    rows = []
    for row in read_order(9):  # row 4's caption is empty: a bad row, passed over
        if row != 4:
            rows.append(row)
        if len(rows) == 5:
            break
    assert sample.captions == [f"caption {row}" for row in sorted(rows)]
    assert sample.record()["rows"] == 9 and not sample.every_caption
