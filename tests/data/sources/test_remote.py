"""Remote shards: http(s) URLs served from 127.0.0.1, pipe: commands and fsspec URLs are
streamed (never seeked), counted without a plan that seeks, retried, and read to the same
samples as the local files; a broken one is a named bad sample, never a crashed run."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.bad_data import small_shard
from tests.helpers.http_server import Server
from tests.helpers.shards import (
    SHARD_SIZES,
    assert_same,
    key_of,
    keys_of,
    run,
    skipped_of,
    write_shards,
)
from tests.helpers.tar_members import (
    MIB,
    good,
    hostile,
    member,
    peak_bytes,
    png,
    sparse_caption,
    write_shard,
)
from threetowers.config import load_config
from threetowers.data.caches.identity import dataset_digest, files_digest
from threetowers.data.caches.units import ShardUnit, dataset_units
from threetowers.data.pipeline import open_training_pairs
from threetowers.data.sources import remote_identity, remote_stream, shards
from threetowers.data.sources.loader import pair_batches
from threetowers.data.sources.pairs import iter_pairs, open_pairs
from threetowers.data.sources.shards import ShardPairs
from threetowers.data.sources.tar_archive import IMAGE_LIMIT
from threetowers.data.sources.tar_samples import count_samples, read_samples

SIZES = SHARD_SIZES[:1] + [SHARD_SIZES[1] + 1] + SHARD_SIZES[2:]  # shard 1 holds an orphan
NAMES = [f"train-{number:06d}.tar" for number in range(len(SIZES))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("remote") / "shards", SHARD_SIZES, stray=True)


@pytest.fixture(scope="module")
def module_server(folder):
    server = Server(folder.parent)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def server(module_server, folder):
    """The module's server, its requests and faults cleared, serving ``shards/`` as root."""
    module_server.reset()
    return module_server


@pytest.fixture(autouse=True)
def fresh_counts(tmp_path, monkeypatch):
    """Each test starts with no count known in this process, an empty count cache of its
    own and retries a few milliseconds apart."""
    monkeypatch.setattr(shards, "_REMOTE_COUNTS", {})
    monkeypatch.setattr(shards, "_PLANNED", {})
    monkeypatch.setenv("THREETOWERS_COUNT_CACHE", str(tmp_path / "counts"))
    monkeypatch.setattr(remote_stream, "FIRST_DELAY", 0.01)


def urls(server) -> list[str]:
    return [f"{server.url}/shards/{name}" for name in NAMES]


def pattern(server) -> str:
    return f"{server.url}/shards/train-{{000000..{len(SIZES) - 1:06d}}}.tar"


def prefix_free(sample_ids):
    return [key_of(sample_id) for sample_id in sample_ids]


def members(samples):
    """Each sample's key and member bytes, or why it is bad, without where it came from."""
    return [
        {k: v[0] if k == "__bad__" else v for k, v in sample.items() if k != "__url__"}
        for sample in samples
    ]


# --------------------------------------------------------------------------- same samples


def test_http_pipe_and_local_shards_give_the_same_samples(server, folder):
    local = [folder / name for name in NAMES]
    piped = [f"pipe:cat {path}" for path in local]
    for shard, url, command in zip(local, urls(server), piped, strict=True):
        want = list(read_samples(shard))
        assert members(read_samples(url)) == members(want)  # the bytes of every member
        assert members(read_samples(command)) == members(want)
    expected = list(iter_pairs(folder))
    for source, spelled in ((pattern(server), urls(server)), (piped, piped)):
        got = list(iter_pairs(source))
        assert [key_of(item.id) for item in got] == [key_of(item.id) for item in expected]
        # ids differ only in the shard: its URL or command in place of its path
        shard_of = [Path(item.id.rsplit("/", 1)[0]).name for item in expected]
        assert [item.id.rsplit("/", 1)[0] for item in got] == [
            spelled[NAMES.index(name)] for name in shard_of
        ]
        for mine, theirs in zip(got, expected, strict=True):
            if hasattr(theirs, "image"):
                assert mine.image.tobytes() == theirs.image.tobytes()
                assert mine.captions == theirs.captions and mine.row == theirs.row
            else:
                assert mine.reason == theirs.reason == "no_image"


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_batches_over_http_equal_the_local_ones_and_resume_exactly(server, folder):
    local = run(folder, num_workers=2, shuffle_buffer=16)
    full = run(pattern(server), num_workers=2, shuffle_buffer=16)
    assert [prefix_free(b["ids"]) for b in full] == [prefix_free(b["ids"]) for b in local]
    for mine, theirs in zip(full, local, strict=True):
        assert all(i.startswith(server.url) for i in mine["ids"])
        for name in ("image", "caption", "draw"):
            assert torch.equal(mine[name], theirs[name])
    for start in (1, 3, len(full) - 1):
        assert_same(
            run(pattern(server), num_workers=2, shuffle_buffer=16, start_batch=start), full[start:]
        )


def test_every_spelling_of_remote_shards_opens(server, folder):
    one = urls(server)[0]
    assert open_pairs(one).shards == [one] and open_pairs(one).sizes == SIZES[:1]
    assert open_pairs(urls(server)).sizes == SIZES
    assert open_pairs(pattern(server)).shards == urls(server)
    command = f"pipe:cat {folder / NAMES[0]}"
    assert open_pairs(command).shards == [command]
    assert open_pairs(f"pipe:cat {folder}/train-{{000000..000001}}.tar").sizes == SIZES[:2]
    mixed = open_pairs([str(folder / NAMES[0]), urls(server)[1]])  # local and remote alike
    assert mixed.shards == [folder / NAMES[0], urls(server)[1]] and mixed.sizes == SIZES[:2]
    with pytest.raises(ValueError, match="remote source must name .tar shards"):
        open_pairs(f"{server.url}/pairs.csv")
    with pytest.raises(ValueError, match="remote parquet files cannot be streamed"):
        open_pairs([f"{server.url}/train-00000-of-00001.parquet"])
    with pytest.raises(ValueError, match="list source must hold"):
        open_pairs([f"{server.url}/pairs.csv"])


# --------------------------------------------------------------------------- counting


def test_counts_come_from_stats_json_without_reading_a_shard(server, folder, tmp_path):
    beside = folder.parent / "with_stats"
    shutil.copytree(folder, beside, dirs_exist_ok=True)
    for name, size in zip(NAMES, SIZES, strict=True):
        stats = {"count": size + 2, "successes": size, "failed_to_download": 2}
        (beside / name.replace(".tar", "_stats.json")).write_text(json.dumps(stats))
    source = pattern(server).replace("/shards/", "/with_stats/")
    assert open_pairs(source).sizes == SIZES
    assert server.gets(".tar") == 0  # no shard was read to plan the epoch
    assert server.gets("_stats.json") == len(SIZES)
    batches = run(source, num_workers=2, drop_last=False)  # planned == streamed
    assert sorted(keys_of(batches)) == sorted(keys_of(run(folder, drop_last=False)))
    assert skipped_of(batches) == [("orphan", "no_image")]
    assert not list((tmp_path / "counts").glob("*.json"))  # nothing to keep: stats are cheap


def test_streamed_counts_are_kept_by_identity(server, folder, tmp_path):
    served = folder.parent / "counted"
    shutil.copytree(folder, served, dirs_exist_ok=True)
    source = pattern(server).replace("/shards/", "/counted/")
    assert open_pairs(source).sizes == SIZES
    assert server.gets(".tar") == len(SIZES)  # each streamed once to count it
    assert len(list((tmp_path / "counts").glob("*.json"))) == len(SIZES)
    shards._REMOTE_COUNTS.clear()  # as a new process: only the count cache knows
    server.reset()
    assert open_pairs(source).sizes == SIZES
    assert server.gets(".tar") == 0  # the second open streamed nothing
    # a changed shard (another size, another identity) is counted again, alone
    write_shard(served / NAMES[2], good("x"), good("y"))
    server.reset()
    assert open_pairs(source).sizes == SIZES[:2] + [2] + SIZES[3:]
    assert server.gets(".tar") == 1 and server.gets(NAMES[2]) == 1


def test_a_pipe_command_is_counted_once_and_kept_by_its_command(folder, tmp_path):
    command = f"pipe:cat {folder / NAMES[3]}"
    assert remote_identity.identity(command) == {"url": command}
    assert open_pairs(command).sizes == SIZES[3:4]
    (kept,) = (tmp_path / "counts").glob("*.json")
    assert json.loads(kept.read_text()) == {"identity": {"url": command}, "samples": SIZES[3]}


# --------------------------------------------------------------------------- failures


def cut_inside_fourth_sample(shard: Path) -> int:
    with tarfile.open(shard) as archive:
        return archive.getmembers()[6].offset_data + 5  # in the image of the 4th sample


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_remote_shard_cut_mid_stream_is_counted_as_truncated_and_named(server, folder):
    cut_at = cut_inside_fourth_sample(folder / NAMES[3])
    url = urls(server)[3]
    server.cut[f"/shards/{NAMES[3]}"] = cut_at
    source = open_pairs(pattern(server))
    assert source.sizes == SIZES[:3] + [4] + SIZES[4:]  # the cut sample counts, later ones not
    batches = run(source, num_workers=2, drop_last=False)  # no count mismatch
    used = [i for b in batches for i in b["ids"]]
    skipped = [bad for b in batches for bad in b["skipped"]]
    assert len(used) + len(skipped) == sum(source.sizes)
    (truncated,) = [bad for bad in skipped if bad.reason == "truncated_shard"]
    fourth = key_of(truncated.id)
    assert truncated.id == f"{url}/{fourth}" and url in truncated.detail
    assert "transfer broke off" in truncated.detail and "curl: (18)" in truncated.detail
    in_shard = [key_of(i) for i in used if i.startswith(url + "/")]
    with tarfile.open(folder / NAMES[3]) as archive:
        keys = list(dict.fromkeys(Path(m.name).stem for m in archive.getmembers()))
    assert sorted(in_shard) == keys[:3] and fourth == keys[3]  # the samples before it used
    # the very samples of the same bytes cut locally
    local_cut = folder.parent / "cut.tar"
    local_cut.write_bytes((folder / NAMES[3]).read_bytes()[:cut_at])
    assert [s["__key__"] for s in read_samples(local_cut)] == keys[:4]


def test_a_shard_that_fails_twice_is_read_after_retries(server, folder):
    server.fail[f"/shards/{NAMES[1]}"] = 2
    assert members(read_samples(urls(server)[1])) == members(read_samples(folder / NAMES[1]))
    assert server.gets(NAMES[1]) == 3


def test_a_transfer_that_breaks_off_once_goes_on_where_it_stopped(server, folder):
    path = f"/shards/{NAMES[5]}"
    server.cut[path], server.cuts_left[path] = cut_inside_fourth_sample(folder / NAMES[5]), 1
    streamed = list(read_samples(urls(server)[5]))
    assert members(streamed) == members(read_samples(folder / NAMES[5]))  # nothing bad
    assert server.gets(NAMES[5]) == 2


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_shard_that_always_fails_is_one_bad_sample_named(server):
    server.fail[f"/shards/{NAMES[4]}"] = 10**9
    bad = urls(server)[4]
    source = open_pairs(pattern(server))
    assert source.sizes == SIZES[:4] + [1] + SIZES[5:]
    assert server.gets(NAMES[4]) == remote_stream.TRIES  # tried, not forever
    batches = run(source, num_workers=2, drop_last=False)
    unreachable = [s for b in batches for s in b["skipped"] if s.reason == "unreachable_shard"]
    assert [s.id for s in unreachable] == [f"{bad}/{NAMES[4]}"]
    assert bad in unreachable[0].detail and "503" in unreachable[0].detail
    used = sum(len(b["ids"]) for b in batches)
    assert used == sum(SIZES) - SIZES[4] - 1  # every other good sample; the orphan is bad
    assert server.gets(NAMES[4]) == remote_stream.TRIES  # the stream did not ask again
    (only,) = read_samples(bad)  # read alone: the same one bad sample, after its tries
    assert (
        only["__bad__"][0] == "unreachable_shard"
        and f"({remote_stream.TRIES} tries)" in only["__bad__"][1]
    )


def test_a_missing_shard_is_not_asked_again(server):
    (only,) = read_samples(f"{server.url}/shards/train-000099.tar")
    reason, detail = only["__bad__"]
    assert reason == "unreachable_shard" and "404" in detail and "tries" not in detail
    assert server.gets("train-000099.tar") == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_failing_pipe_command_is_one_bad_sample(folder):
    failing = "pipe:cat /nonexistent/train-000009.tar"
    source = [f"pipe:cat {folder / name}" for name in NAMES[:3]] + [failing]
    assert open_pairs(source).sizes == SIZES[:3] + [1]
    batches = run(source, num_workers=2, drop_last=False)
    (bad,) = [s for b in batches for s in b["skipped"] if s.reason == "unreachable_shard"]
    assert bad.id == f"{failing}/train-000009.tar" and failing in bad.detail
    assert "exited with status 1" in bad.detail


# --------------------------------------------------------------------------- plan == stream


def test_a_stream_is_fitted_to_its_planned_count(server, folder):
    beside = folder.parent / "wrong_stats"
    shutil.copytree(folder, beside, dirs_exist_ok=True)
    claims = {NAMES[0]: SIZES[0] + 2, NAMES[2]: SIZES[2] - 2}  # more, and fewer, than held
    for name, successes in claims.items():
        (beside / name.replace(".tar", "_stats.json")).write_text(
            json.dumps({"successes": successes})
        )
    source = [f"{server.url}/wrong_stats/{name}" for name in (NAMES[0], NAMES[2])]
    pairs = open_pairs(source)
    assert pairs.sizes == list(claims.values())
    batches = pair_batches(source, example=lambda p, r: {}, batch_size=3, seed=0, epoch=0)
    got = list(iter_pairs(pairs))
    assert len(got) == sum(pairs.sizes)  # what the plan promised, exactly
    missing = [item for item in got[: pairs.sizes[0]] if not hasattr(item, "image")]
    assert [key_of(m.id) for m in missing] == [f"missing-{SIZES[0] + 1}", f"missing-{SIZES[0] + 2}"]
    assert all(m.reason == "truncated_shard" and "never arrived" in m.detail for m in missing)
    last = got[-1]
    assert last.reason == "truncated_shard" and "left out" in last.detail
    assert sum(1 for _ in batches) == sum(pairs.sizes) // 3


def test_a_shard_unreachable_when_counted_stays_one_bad_sample(server, folder):
    server.fail[f"/shards/{NAMES[0]}"] = 3 * remote_stream.TRIES  # down while the epoch is planned
    pairs = open_pairs(urls(server)[0])
    assert pairs.sizes == [1]
    server.reset()  # back up: reading it now would not fit the plan
    (only,) = iter_pairs(pairs)
    assert only.reason == "unreachable_shard" and "when its samples were counted" in only.detail
    assert server.gets(NAMES[0]) == 0


# --------------------------------------------------------------------------- tar guarantees


def test_a_stream_cut_anywhere_reads_as_the_file_cut_there(tmp_path):
    data, whole = small_shard(tmp_path / "whole.tar")
    cut = tmp_path / "cut.tar"
    command = f"pipe:cat {cut}"
    for end in range(0, len(data) + 1, 512):  # cuts on header, member and sample boundaries
        cut.write_bytes(data[:end])
        streamed = list(read_samples(command))
        assert members(streamed) == members(read_samples(cut)), end
        assert len(streamed) == count_samples(command) == count_samples(cut)
        truncated = [s for s in streamed if s.get("__bad__", ("",))[0] == "truncated_shard"]
        assert len(truncated) == (end < whole), end
        assert not truncated or command in truncated[0]["__bad__"][1]


def test_hostile_members_in_a_stream_are_refused_unread(tmp_path):
    shard = write_shard(
        tmp_path / "hostile.tar",
        good("a"),
        *hostile("image"),  # a 64 MiB + 1 image member, streamed past
        member("sparse.png", png()),
        sparse_caption("sparse", 1 << 30),
        good("a"),  # a key that comes back later
        good("b"),
    )
    samples, peak = peak_bytes(f"pipe:cat {shard}")
    assert peak < 8 * MIB  # nothing near IMAGE_LIMIT was held
    assert [s["__key__"] for s in samples] == ["a", "big", "sparse", "a", "b"]
    reasons = [s.get("__bad__", ("",))[0] for s in samples]
    assert reasons == ["", "member_too_large", "malformed_row", "malformed_row", ""]
    assert f"{IMAGE_LIMIT + 1:,}" in samples[1]["__bad__"][1]
    assert "comes back" in samples[3]["__bad__"][1]
    assert members(samples) == members(read_samples(shard))


def test_members_larger_than_the_read_ahead_stream_whole(tmp_path):
    # pieces of 64 KiB are read ahead: members across, at and just past their edges
    sizes = [100_000, 65_536, 1, 65_537, 70_000, 3 * 65_536 + 17]
    rng = np.random.default_rng(0)
    parts = [member(f"s{i}.bin", rng.bytes(size)) + good(f"s{i}") for i, size in enumerate(sizes)]
    shard = write_shard(tmp_path / "large.tar", *parts)
    streamed = list(read_samples(f"pipe:cat {shard}"))
    assert [len(s["bin"]) for s in streamed] == sizes
    assert members(streamed) == members(read_samples(shard))


def test_compression_follows_the_name_in_streams_too(server, tmp_path):
    plain = write_shard(tmp_path / "plain.tar", good("a"), good("b"))
    packed = server.root / "packed"
    packed.mkdir(exist_ok=True)
    (packed / "x.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (packed / "x.tar").write_bytes(gzip.compress(plain.read_bytes()))
    assert members(read_samples(f"{server.url}/packed/x.tar.gz")) == members(read_samples(plain))
    (only,) = read_samples(f"{server.url}/packed/x.tar")
    assert only["__bad__"][0] == "compressed_shard" and "gzip-compressed" in only["__bad__"][1]
    assert count_samples(f"{server.url}/packed/x.tar") == 1


# --------------------------------------------------------------------------- fsspec, caches


def test_fsspec_urls_stream_and_need_the_extra(folder, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    monkeypatch.setattr(type(memory), "store", {})  # fsspec's memory is global: our own
    monkeypatch.setattr(type(memory), "pseudo_dirs", [""])
    for name in NAMES[:2]:
        memory.pipe(f"/remote-test/{name}", (folder / name).read_bytes())
    url = f"memory://remote-test/{NAMES[0]}"
    assert members(read_samples(url)) == members(read_samples(folder / NAMES[0]))
    assert remote_identity.identity(url)["size"] == (folder / NAMES[0]).stat().st_size
    assert open_pairs("memory://remote-test/train-{000000..000001}.tar").sizes == SIZES[:2]
    (only,) = read_samples("memory://remote-test/absent.tar")
    assert only["__bad__"][0] == "unreachable_shard"
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'threetowers\[remote\]'"):
        open_pairs("s3://bucket/data/00000.tar")


def test_a_remote_shard_is_known_by_url_and_etag_size_or_time(server, folder):
    served = folder.parent / "identity"
    shutil.copytree(folder, served, dirs_exist_ok=True)
    url = f"{server.url}/identity/{NAMES[0]}"
    known = remote_identity.identity(url)
    assert known["url"] == url and known["size"] == str((served / NAMES[0]).stat().st_size)
    unit = ShardUnit(url, 0, SIZES[0])
    before, digest = unit.identity(), files_digest([url])
    assert unit.identity() == before and dataset_digest(url) == dataset_digest([url])
    write_shard(served / NAMES[0], good("x"))  # another size: another identity
    assert unit.identity() != before and files_digest([url]) != digest
    assert [u.path for u in dataset_units(pattern(server))] == urls(server)
    command = f"pipe:cat {served / NAMES[0]}"
    assert files_digest([command]) == files_digest([command])  # the command alone
    down = "http://127.0.0.1:1/x.tar"
    assert remote_identity.identity(down) is None and files_digest([down]) != files_digest([url])
    samples = list(ShardUnit(urls(server)[1], 0, SIZES[1]).samples())
    local = list(ShardUnit(str(folder / NAMES[1]), 0, SIZES[1]).samples())
    assert [key for key, _ in samples] == [key for key, _ in local]


def test_shard_pairs_keeps_remote_shards_as_spelled(server):
    pairs = ShardPairs(urls(server)[:2])
    assert pairs.shards == urls(server)[:2] and "//" in pairs.shards[0]


def test_data_train_takes_remote_shards(server):
    cfg = load_config("tiny", overrides=[f"data.train={pattern(server)}"])
    pairs, mix = open_training_pairs(cfg)
    assert pairs.shards == urls(server) and pairs.sizes == SIZES
    assert mix.name_of(f"{urls(server)[2]}/k0012") == "0"
