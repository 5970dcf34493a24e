"""Local tars' sample counts kept in data.cache_dir: the counts a scan gives, scanned once for
every process, a changed shard scanned again, a damaged index rebuilt."""

from __future__ import annotations

import json
import logging
import os

import pytest

from tests.helpers.bad_data import small_shard
from tests.helpers.shards import SHARD_SIZES, write_shards
from threetowers.data.sources import shard_index
from threetowers.data.sources import shards as shards_module
from threetowers.data.sources.mix import open_sources
from threetowers.data.sources.pairs import open_pairs
from threetowers.data.sources.tar_samples import count_file, count_samples


@pytest.fixture
def new_process(monkeypatch):
    """This process's own memory of counts emptied, as in a process that starts now; returns
    the shards whose headers are scanned from then on."""
    monkeypatch.setattr(shards_module, "_COUNT_CACHE", {})
    scanned = []

    def spied(path):
        scanned.append(path.name)
        return count_file(path)

    monkeypatch.setattr(shards_module, "count_file", spied)
    return scanned


def refuse_scans(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("a tar's headers were scanned")

    monkeypatch.setattr(shards_module, "count_file", refused)
    monkeypatch.setattr(shards_module, "count_samples", refused)


@pytest.fixture
def folder(tmp_path):
    return write_shards(tmp_path / "shards", SHARD_SIZES, stray=True)


def index_files(cache):
    return sorted(cache.glob("shard_counts-*.json"))


def test_the_index_gives_the_counts_a_scan_gives_and_keeps_whole_shards_only(
    tmp_path, folder, new_process
):
    data, whole = small_shard(folder / "small.tar", samples=5)
    (folder / "cut.tar").write_bytes(data[: whole - 700])  # inside its last sample
    (folder / "empty.tar").write_bytes(b"")  # cannot be opened: one bad sample
    shards = sorted(folder.glob("*.tar"))
    cache = tmp_path / "cache"
    pairs = open_pairs(shards, shard_index=cache)
    scanned = [count_samples(path) for path in shards]
    assert pairs.sizes == scanned
    assert scanned[:3] == [5, 1, 5]  # cut (its last sample cut), empty, small
    (index,) = index_files(cache)
    record = json.loads(index.read_text())
    assert record["folder"] == str(folder.resolve())
    kept = {name: entry["samples"] for name, entry in record["shards"].items()}
    unkept = ("cut.tar", "empty.tar")  # a count an I/O error may have decided
    assert kept == {p.name: n for p, n in zip(shards, scanned, strict=True) if p.name not in unkept}


def test_a_second_process_reads_the_index_not_the_headers(tmp_path, folder, monkeypatch):
    cache = tmp_path / "cache"
    first = open_pairs(folder, shard_index=cache)  # counted as it is opened
    monkeypatch.setattr(shards_module, "_COUNT_CACHE", {})
    refuse_scans(monkeypatch)
    assert open_pairs(folder, shard_index=cache).sizes == first.sizes == [5, 8, 6, 8, 4, 9]


def test_a_cut_shard_is_scanned_by_every_process(tmp_path, folder, new_process):
    data, whole = small_shard(folder / "small.tar", samples=5)
    (folder / "cut.tar").write_bytes(data[: whole - 700])
    cache = tmp_path / "cache"
    open_pairs(folder, shard_index=cache)
    shards_module._COUNT_CACHE.clear()
    new_process.clear()
    assert open_pairs(folder, shard_index=cache).sizes[0] == 5
    assert new_process == ["cut.tar"]  # its count may be an I/O error's: never kept


def test_sources_joined_count_from_their_opening(tmp_path, folder, monkeypatch):
    """data.train as several sources: each opened with the index, then joined as one
    ShardPairs, which finds their counts in this process."""
    other = write_shards(tmp_path / "other", [3, 2])
    cache = tmp_path / "cache"
    sources = [("a", str(folder), 1.0), ("b", str(other), 1.0)]
    opened = open_sources(sources, lambda source: open_pairs(source, shard_index=cache))
    refuse_scans(monkeypatch)
    joined, _ = opened
    assert joined.sizes == [5, 8, 6, 8, 4, 9, 3, 2]
    assert len(index_files(cache)) == 2  # one per folder of shards


def test_a_changed_shard_is_scanned_again_and_a_removed_one_dropped(tmp_path, folder, new_process):
    cache = tmp_path / "cache"
    open_pairs(folder, shard_index=cache)
    changed = folder / "train-000002.tar"
    stat = changed.stat()
    write_shards(tmp_path / "again", [2, 3, 11])
    os.replace(tmp_path / "again" / "train-000002.tar", changed)  # 11 samples now
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    (folder / "train-000005.tar").unlink()
    shards_module._COUNT_CACHE.clear()
    new_process.clear()
    assert open_pairs(folder, shard_index=cache).sizes == [5, 8, 11, 8, 4]
    assert new_process == ["train-000002.tar"]
    (index,) = index_files(cache)
    entries = json.loads(index.read_text())["shards"]
    assert sorted(entries) == [f"train-{n:06d}.tar" for n in range(5)]
    assert entries["train-000002.tar"]["samples"] == 11


@pytest.mark.parametrize(
    "damage",
    ["{not json", "[1, 2]", '{"format": 1, "folder": "elsewhere", "shards": {}}', "garbage"],
)
def test_a_damaged_index_is_ignored_with_a_warning_and_rebuilt(
    tmp_path, folder, new_process, caplog, damage
):
    cache = tmp_path / "cache"
    open_pairs(folder, shard_index=cache)
    (index,) = index_files(cache)
    if damage == "garbage":  # an entry that is not numbers
        record = json.loads(index.read_text())
        record["shards"]["train-000000.tar"]["samples"] = "five"
        damage = json.dumps(record)
    index.write_text(damage)
    shards_module._COUNT_CACHE.clear()
    new_process.clear()
    with caplog.at_level(logging.WARNING, logger=shard_index.__name__):
        assert open_pairs(folder, shard_index=cache).sizes == [5, 8, 6, 8, 4, 9]
    assert len(new_process) == len(SHARD_SIZES)  # scanned again
    assert f"shard index {index} is unusable" in caplog.text
    keys = [shard_index.shard_key(path) for path in sorted(folder.glob("*.tar"))]
    assert list(shard_index.load(cache, keys).values()) == [5, 8, 6, 8, 4, 9]  # written anew


def test_a_cache_dir_that_cannot_be_written_is_passed_over(tmp_path, folder, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger=shard_index.__name__):
        assert open_pairs(folder, shard_index=blocked).sizes == [5, 8, 6, 8, 4, 9]
    assert "cannot keep the sample counts" in caplog.text and str(folder) in caplog.text


def test_a_shard_rewritten_at_its_size_is_known_by_its_time(tmp_path, new_process):
    cache = tmp_path / "cache"
    shard = write_shards(tmp_path / "one", [1]) / "train-000000.tar"
    two = write_shards(tmp_path / "two", [2]) / "train-000000.tar"
    assert shard.stat().st_size == two.stat().st_size  # tar pads both to one record
    assert open_pairs(shard, shard_index=cache).sizes == [1]
    mtime = shard.stat().st_mtime_ns
    os.replace(two, shard)
    os.utime(shard, ns=(mtime + 1, mtime + 1))
    shards_module._COUNT_CACHE.clear()
    assert open_pairs(shard, shard_index=cache).sizes == [2]
