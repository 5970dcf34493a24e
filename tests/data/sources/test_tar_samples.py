"""A tar shard read for some of its members only: the others' data is never read, and the
same samples are bad as in a whole read."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from tests.helpers.bad_data import small_shard
from tests.helpers.tar_members import good, hostile, member, png, write_shard
from threetowers.data.sources import tar_archive
from threetowers.data.sources.tar_samples import count_file, read_samples

IMAGE_BYTES = 256 << 10


class CountingFile:
    """A file that counts the bytes read through it."""

    read_total = 0

    def __init__(self, path, mode):
        self.file = open(path, mode)  # noqa: SIM115 (closed by whoever closes this)

    def read(self, size=-1):
        data = self.file.read(size)
        CountingFile.read_total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.fixture
def counted_reads(monkeypatch):
    """Bytes read from shards by tar_archive's plain opener (builtins.open otherwise)."""
    CountingFile.read_total = 0
    monkeypatch.setattr(tar_archive, "open", CountingFile, raising=False)
    return CountingFile


def big_image_shard(path, samples: int = 12):
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for i in range(samples):
            noise = rng.integers(0, 256, IMAGE_BYTES, dtype=np.uint8).tobytes()
            sink.write({"__key__": f"s{i}", "jpg": noise, "txt": f"caption {i}"})
    return path


def test_unwanted_members_stand_as_none_and_their_bytes_are_not_read(tmp_path, counted_reads):
    shard = big_image_shard(tmp_path / "big.tar")
    whole = list(read_samples(shard))
    read_whole, counted_reads.read_total = counted_reads.read_total, 0
    captions = list(read_samples(shard, members={"txt"}))
    assert read_whole > 12 * IMAGE_BYTES
    assert counted_reads.read_total < 12 * 4096  # headers and captions: no image byte
    assert [s["txt"] for s in captions] == [s["txt"] for s in whole]
    assert all(s["jpg"] is None for s in captions)
    assert [s["__key__"] for s in captions] == [s["__key__"] for s in whole]


def bad_reasons(samples):
    return [(s["__key__"], s.get("__bad__", ("",))[0]) for s in samples]


@pytest.mark.parametrize("kind", ["image", "caption", "json"])
def test_unread_members_are_checked_from_their_headers(tmp_path, kind):
    shard = write_shard(tmp_path / "hostile.tar", good("a"), *hostile(kind), good("b"))
    whole = bad_reasons(read_samples(shard))
    assert whole == [("a", ""), ("big", "member_too_large"), ("b", "")]
    assert bad_reasons(read_samples(shard, members={"txt"})) == whole


def test_a_member_twice_is_malformed_whether_read_or_not(tmp_path):
    twice = [member("b.png", png()), member("b.png", png()), member("b.txt", b"x")]
    shard = write_shard(tmp_path / "twice.tar", good("a"), *twice, good("c"))
    assert bad_reasons(read_samples(shard, members={"txt"}))[1] == ("b", "malformed_row")


def test_a_shard_cut_anywhere_gives_the_same_bad_samples_read_or_not(tmp_path):
    data, whole = small_shard(tmp_path / "small.tar", samples=3)
    cut = tmp_path / "cut.tar"
    for end in range(0, whole, 61):
        cut.write_bytes(data[:end])
        assert bad_reasons(read_samples(cut, members={"txt"})) == bad_reasons(read_samples(cut))


def test_count_file_says_when_a_count_is_not_the_datas_own(tmp_path):
    data, whole = small_shard(tmp_path / "small.tar", samples=3)
    assert count_file(tmp_path / "small.tar").failure is None
    (tmp_path / "cut.tar").write_bytes(data[: whole - 1024])  # without the end blocks
    assert count_file(tmp_path / "cut.tar").samples == 3
    assert count_file(tmp_path / "cut.tar").failure is not None
    (tmp_path / "empty.tar").write_bytes(b"")
    unopenable = count_file(tmp_path / "empty.tar")
    assert unopenable.samples == 1 and unopenable.failure is not None
