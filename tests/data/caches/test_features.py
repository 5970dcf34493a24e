"""The frozen towers' feature caches: a row per sample, equal to the live tower, stored per
unit of the data (shard or table chunk), built in one pass for several towers, kept across a
killed build, checked instead of trusted, and read by a loader only for its own shards."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.conftest import tiny_backbone
from tests.helpers.feature_caches import build, colliding_shards, live
from threetowers.data.caches import units as cached
from threetowers.data.caches.streamed_features import UnitMismatch
from threetowers.data.pipeline import TrainingExample
from threetowers.data.sources.bad_samples import Skipped
from threetowers.data.sources.loader import pair_batches
from threetowers.data.sources.pairs import iter_pairs, open_pairs
from threetowers.data.sources.table import PairTable


def numbered_shards(folder: Path, shards: int, per_shard: int) -> list[Path]:
    folder.mkdir()
    noise = np.random.default_rng(11)
    paths = []
    for shard in range(shards):
        paths.append(folder / f"part-{shard:03d}.tar")
        with wds.TarWriter(str(paths[-1])) as sink:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(noise.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
                    buffer, "PNG"
                )
                key = f"{shard:03d}{i:04d}"
                sink.write({"__key__": key, "png": buffer.getvalue(), "txt": b"a picture"})
    return paths


def test_samples_of_shards_that_share_keys_keep_their_own_features(tmp_path):
    folder = colliding_shards(tmp_path / "data")
    h = tiny_backbone()
    cache = build(h, folder, tmp_path / "cache")["h"]
    assert len(cache) == 20 and len(cache.units) == 2  # one unit per shard
    rows = []
    for pair in iter_pairs(folder):  # each sample's row is h of its own image
        rows.append(cache.features(pair.row, pair.key))
        torch.testing.assert_close(rows[-1], live(h, pair.image), rtol=1e-5, atol=1e-6)
    assert len(torch.unique(torch.stack(rows), dim=0)) == 20
    with pytest.raises(UnitMismatch, match="holds sample '000000000', not '000000001'"):
        cache.features(0, "000000001")  # never another sample's row


def test_float16_rows_are_the_float32_rows_rounded(tmp_path):
    folder = colliding_shards(tmp_path / "data")
    h = tiny_backbone()
    exact = build(h, folder, tmp_path / "cache")["h"]
    half = build(h, folder, tmp_path / "cache", dtype="float16")["h"]
    assert Path(half.units[0].npy).parent != Path(exact.units[0].npy).parent
    for pair in iter_pairs(folder):
        row = exact.features(pair.row, pair.key)
        assert torch.equal(half.features(pair.row, pair.key), row.half().float())
    npy = np.load(half.units[0].npy)
    assert npy.dtype == np.float16 and npy.shape == (10, h.feature_dim)


def test_a_table_is_cached_in_chunks_and_bad_rows_stay_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(cached, "TABLE_CHUNK", 4)
    noise = np.random.default_rng(3)
    lines = []
    for i in range(10):
        Image.fromarray(noise.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"picture {i}"}))
    lines[6] = json.dumps({"image": "missing.png", "caption": "gone"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    table = PairTable.from_jsonl(tmp_path / "pairs.jsonl")
    h = tiny_backbone()
    cache = build(h, table, tmp_path / "cache")["h"]
    assert [(unit.start, unit.size) for unit in cache.units] == [(0, 4), (4, 4), (8, 2)]
    for row in range(10):
        found = cache.lookup(row, table.keys[row])
        if row == 6:
            assert isinstance(found, Skipped) and found.reason == "missing_file"
        else:
            torch.testing.assert_close(found, live(h, table[row].image), rtol=1e-5, atol=1e-6)


def test_two_towers_are_built_in_one_pass_that_decodes_each_image_once(tmp_path, monkeypatch):
    folder = colliding_shards(tmp_path / "data")
    decoded = []
    original = cached.decode_sample
    monkeypatch.setattr(cached, "decode_sample", lambda *a: decoded.append(1) or original(*a))
    towers = {"big": tiny_backbone(24), "small": tiny_backbone(12)}
    caches = build(towers, folder, tmp_path / "cache")
    assert len(decoded) == 20
    for pair in iter_pairs(folder):
        for name, tower in towers.items():
            got = caches[name].features(pair.row, pair.key)
            torch.testing.assert_close(got, live(tower, pair.image), rtol=1e-5, atol=1e-6)
    build(towers, folder, tmp_path / "cache")  # complete: nothing decoded again
    assert len(decoded) == 20


def test_a_killed_build_keeps_its_finished_shards_and_a_changed_shard_alone_is_redone(
    tmp_path, monkeypatch
):
    shards = numbered_shards(tmp_path / "data", shards=4, per_shard=5)
    h = tiny_backbone()
    cache = build(h, shards, tmp_path / "cache")["h"]
    reference = {pair.key: cache.features(pair.row, pair.key) for pair in iter_pairs(shards)}
    # a kill during the third shard: its index was never written (the .npy may be there)
    Path(cache.units[2].index).unlink()
    # and the last shard was rewritten since (new modification time, same content)
    os.utime(shards[3], ns=(1, 1))
    read = []
    original = cached.ShardUnit.samples
    monkeypatch.setattr(
        cached.ShardUnit,
        "samples",
        lambda unit: read.append(Path(unit.path).name) or original(unit),
    )
    again = build(h, shards, tmp_path / "cache")["h"]
    assert read == ["part-002.tar", "part-003.tar"]
    for pair in iter_pairs(shards):
        assert torch.equal(again.features(pair.row, pair.key), reference[pair.key])


@pytest.mark.parametrize("damage", ["flipped", "short"])
def test_every_build_checks_the_bytes_of_existing_units(tmp_path, caplog, damage):
    folder = colliding_shards(tmp_path / "data")
    h = tiny_backbone()
    cache = build(h, folder, tmp_path / "cache")["h"]
    npy = Path(cache.units[0].npy)
    good, before = npy.read_bytes(), cache.features(9, "000000009")
    if damage == "flipped":  # same size and header, the last value changed
        npy.write_bytes(good[:-2] + b"\x00\x7c")
    else:  # a copy cut 64 bytes short: its header still promises every row
        npy.write_bytes(good[:-64])
    checked = build(h, folder, tmp_path / "cache")["h"]  # what training does at its start
    assert "its bytes changed since it was written; computing it again" in caplog.text
    assert npy.read_bytes() == good and torch.equal(checked.features(9, "000000009"), before)


def test_a_second_writer_waits_for_the_first_and_computes_nothing_twice(tmp_path, caplog):
    folder = colliding_shards(tmp_path / "data")
    writer = subprocess.Popen(  # another run computing the same cache, slowly
        [sys.executable, "-c", SLOW_WRITER, str(folder), str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3],
    )
    assert writer.stdout.readline().strip() == "computing"
    computed = []
    original = cached.ShardUnit.samples
    with (
        mock.patch.object(
            cached.ShardUnit, "samples", lambda unit: computed.append(unit) or original(unit)
        ),
        caplog.at_level(logging.INFO, logger="threetowers"),
    ):
        cache = build(tiny_backbone(), folder, tmp_path / "cache")["h"]
    assert writer.wait() == 0
    assert f"(pid {writer.pid}) is writing this feature cache; waiting" in caplog.text
    assert computed == []  # the other writer's units, complete and checked, are used
    assert len(cache) == 20


SLOW_WRITER = """
import sys, time
from tests.conftest import tiny_backbone
from tests.helpers.feature_caches import build
from threetowers.data.caches import features

compute = features._compute
def slowly(*args):
    print("computing", flush=True)
    time.sleep(1.5)
    compute(*args)
features._compute = slowly
build(tiny_backbone(), sys.argv[1], sys.argv[2])
"""


def test_a_unit_replaced_by_a_pickle_is_rebuilt_never_unpickled(tmp_path):
    folder = colliding_shards(tmp_path / "data")
    h = tiny_backbone()
    cache = build(h, folder, tmp_path / "cache")["h"]
    marker = tmp_path / "code_ran"
    Path(cache.units[0].npy).write_bytes(pickle.dumps(_Exploit(marker)))
    again = build(h, folder, tmp_path / "cache")["h"]
    assert not marker.exists()
    assert np.load(again.units[0].npy, allow_pickle=False).shape == (10, h.feature_dim)


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_rank_reads_only_the_caches_of_its_own_shards(tmp_path, num_workers):
    shards = numbered_shards(tmp_path / "data", shards=4, per_shard=6)
    h = tiny_backbone()
    cache = build(h, shards, tmp_path / "cache")["h"]
    source = open_pairs(shards)
    mine = set(source.shard_order(0, 0)[1::2])  # rank 1 of 2 (all its workers together)
    for number, unit in enumerate(cache.units):  # rank 0's shards lose their caches
        if number not in mine:
            Path(unit.npy).unlink()
            Path(unit.index).unlink()
    example = TrainingExample(cached={"h": cache})
    keys, seen = [], []
    for batch in pair_batches(
        source,
        example=example,
        batch_size=3,
        seed=0,
        epoch=0,
        rank=1,
        world_size=2,
        num_workers=num_workers,
        shuffle_buffer=4,
    ):
        keys += [sample_id.rpartition("/")[2] for sample_id in batch["ids"]]
        seen.append(batch["frozen_features/h"])
    assert len(keys) == 12 and {int(key[:3]) for key in keys} == mine
    pairs = {pair.key: pair for pair in iter_pairs(shards)}
    for key, features in zip(keys, torch.cat(seen), strict=True):
        torch.testing.assert_close(features, live(h, pairs[key].image), rtol=1e-5, atol=1e-6)
    assert set(pickle.loads(pickle.dumps(cache)).opened) == set()  # no descriptor travels


def test_random_reads_over_more_units_than_open_files_read_each_index_once(tmp_path, monkeypatch):
    """A table's rows come in random order over all its units: more units than a reader keeps
    open must still cost one index read per unit, with every row its own sample's."""
    from threetowers.data.caches import streamed_features

    shards = numbered_shards(tmp_path / "data", shards=4, per_shard=3)
    h = tiny_backbone()
    cache = build(h, shards, tmp_path / "cache")["h"]
    monkeypatch.setattr(streamed_features, "OPEN_UNITS", 2)
    reads = []
    real_loads = json.loads
    monkeypatch.setattr(
        streamed_features.json, "loads", lambda text: reads.append(1) or real_loads(text)
    )
    pairs = list(iter_pairs(shards))
    order = np.random.default_rng(3).permutation(np.tile(np.arange(len(pairs)), 3))
    for row in order:
        pair = pairs[row]
        torch.testing.assert_close(
            cache.features(int(row), pair.key), live(h, pair.image), rtol=1e-5, atol=1e-6
        )
    assert len(reads) == len(cache.units) == 4
    assert len(cache.opened) == 2
