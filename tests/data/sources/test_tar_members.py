"""Hostile shards cost no memory: oversized or sparse members and huge tar headers are
refused unread, and a compressed shard named .tar is never unpacked."""

from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers.bad_data import batches
from tests.helpers.shards import key_of
from tests.helpers.tar_members import (
    GIB,
    MIB,
    good,
    header,
    hostile,
    member,
    peak_bytes,
    png,
    sparse_caption,
    write_shard,
)
from threetowers.data.sources.shards import decode_sample
from threetowers.data.sources.tar_samples import count_samples, read_samples


@pytest.mark.parametrize("kind", ["caption", "json", "image"])
def test_an_oversized_member_makes_its_sample_bad_unread(tmp_path, kind):
    shard = write_shard(tmp_path / "hostile.tar", good("a"), *hostile(kind), good("b"))
    samples, peak = peak_bytes(shard)
    assert peak < 8 * MIB
    assert [s["__key__"] for s in samples] == ["a", "big", "b"]
    assert len(samples) == count_samples(shard)  # the batch plan stays exact
    reason, detail = samples[1]["__bad__"]
    assert reason == "member_too_large" and "big" in detail and str(shard) in detail
    assert [decode_sample(samples[i]).captions for i in (0, 2)] == [["fine a"], ["fine b"]]


def test_an_oversized_member_is_counted_and_named_by_the_loader(tmp_path):
    shard = write_shard(tmp_path / "hostile.tar", good("a"), *hostile("caption"), good("b"))
    out = batches(shard, batch_size=2)
    assert sorted(key_of(i) for batch in out for i in batch["ids"]) == ["a", "b"]
    (bad,) = [bad for batch in out for bad in batch["skipped"]]
    assert bad.id == f"{shard}/big" and bad.reason == "member_too_large"
    assert "big.txt" in bad.detail and f"{GIB:,}" in bad.detail


def test_a_sparse_member_is_refused_unread(tmp_path):
    shard = write_shard(
        tmp_path / "sparse.tar",
        good("a"),
        member("big.png", png()),
        sparse_caption("big", GIB),
        good("b"),
    )
    samples, peak = peak_bytes(shard)
    assert peak < 8 * MIB
    assert [s["__key__"] for s in samples] == ["a", "big", "b"] and count_samples(shard) == 3
    reason, detail = samples[1]["__bad__"]
    assert reason == "malformed_row" and "sparse" in detail and "big.txt" in detail
    assert "__bad__" not in samples[0] and "__bad__" not in samples[2]


@pytest.mark.parametrize("where", ["first", "later"])
def test_a_huge_tar_header_ends_the_shard_unread(tmp_path, where):
    # A pax extended header that claims 1 GiB: tarfile would read it whole.
    pax = [header("././@PaxHeader", GIB, type=tarfile.XHDTYPE), GIB, good("b")]
    parts = pax if where == "first" else [good("a"), *pax]
    shard = write_shard(tmp_path / "header.tar", *parts)
    samples, peak = peak_bytes(shard)
    assert peak < 8 * MIB
    assert len(samples) == count_samples(shard) == 1
    (only,) = samples
    assert only["__key__"] == ("header.tar" if where == "first" else "a")
    assert only["__bad__"][0] == "truncated_shard"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_hostile_shards_add_no_resident_memory(tmp_path):
    shards = [
        write_shard(tmp_path / "hole.tar", good("a"), *hostile("caption"), good("b")),
        write_shard(tmp_path / "sparse.tar", member("big.png", png()), sparse_caption("big", GIB)),
    ]
    # VmHWM, the peak resident memory of this process's own memory map, unlike ru_maxrss
    # which a child inherits from before its exec.
    script = (
        "import re, sys\n"
        "from threetowers.data.sources.bad_samples import BadSample\n"
        "from threetowers.data.sources.shards import decode_sample, shard_samples\n"
        "def peak():\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(re.search(r'VmHWM:\\s*(\\d+) kB', status)[1]) << 10\n"
        "before = peak()\n"
        "for sample in shard_samples(sys.argv[1:]):\n"
        "    try:\n"
        "        decode_sample(sample)\n"
        "    except BadSample:\n"
        "        pass\n"
        "print(peak() - before)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *map(str, shards)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 64 * MIB  # reading either caption would add over 1 GiB


def plain_shard(path) -> bytes:
    write_shard(path, good("a"), good("b"))
    return path.read_bytes()


COMPRESSORS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_a_compressed_shard_named_tar_is_one_bad_shard(tmp_path, kind):
    shard = tmp_path / "packed.tar"
    shard.write_bytes(COMPRESSORS[kind](plain_shard(tmp_path / "plain.tar")))
    assert count_samples(shard) == 1
    (only,) = read_samples(shard)
    assert only["__key__"] == "packed.tar"
    reason, detail = only["__bad__"]
    assert reason == "compressed_shard" and f"{kind}-compressed" in detail
    assert str(shard) in detail and "decompress" in detail


@pytest.mark.parametrize("name", ["s.tar.gz", "s.tgz", "s.tar.bz2", "s.tbz2", "s.tar.xz", "s.txz"])
def test_a_shard_named_compressed_still_reads(tmp_path, name):
    data = plain_shard(tmp_path / "plain.tar")
    kind = {"gz": "gzip", "bz2": "bzip2", "xz": "xz"}[name.split(".")[-1].removeprefix("t")]
    shard = tmp_path / name
    shard.write_bytes(COMPRESSORS[kind](data))
    samples = list(read_samples(shard))
    assert [s["__key__"] for s in samples] == ["a", "b"] and count_samples(shard) == 2
    assert [decode_sample(s).captions for s in samples] == [["fine a"], ["fine b"]]


def test_an_oversized_member_of_a_compressed_shard_is_skipped_unread(tmp_path):
    plain = write_shard(tmp_path / "plain.tar", good("a"), *hostile("image"), good("b"))
    shard = tmp_path / "hostile.tar.gz"
    shard.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
    samples, peak = peak_bytes(shard)
    assert peak < 8 * MIB  # skipped by decompressing in small pieces
    assert [s["__key__"] for s in samples] == ["a", "big", "b"] and count_samples(shard) == 3
    assert samples[1]["__bad__"][0] == "member_too_large"
