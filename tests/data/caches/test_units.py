"""data/caches/units.py: a dataset cut into cache units (a shard each, a table in chunks of
TABLE_CHUNK rows, a list of image files) that together give every sample once in the
dataset's order, bad ones as Skipped; their identities, and their pickling for workers."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from tests.helpers.bad_data import encoded, rgb
from tests.helpers.shards import write_shards
from threetowers.data.caches import units as units_module
from threetowers.data.caches.units import FilesUnit, ShardUnit, TableUnit, dataset_units
from threetowers.data.sources.bad_samples import Skipped


@pytest.fixture
def table(tmp_path):
    (tmp_path / "img").mkdir()
    lines = ["image,caption,key"]
    for i in range(10):
        (tmp_path / "img" / f"{i}.png").write_bytes(encoded(rgb(i)))
        lines.append(f"img/{i}.png,caption {i},k{i}")
    lines[4] = "img/3.png,  ,k3"  # no usable caption
    lines[8] = "img/missing.png,caption 7,k7"  # no image
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv"


def red(image) -> int:
    return np.asarray(image)[0, 0, 0]


def test_a_table_is_cut_into_chunks_that_give_every_row_once_in_order(table, monkeypatch):
    monkeypatch.setattr(units_module, "TABLE_CHUNK", 4)
    cut = dataset_units(table)
    assert [(u.start, u.size) for u in cut] == [(0, 4), (4, 4), (8, 2)]
    assert all(isinstance(u, TableUnit) for u in cut)
    samples = [sample for unit in cut for sample in unit.samples()]
    assert [key for key, _ in samples] == [f"k{i}" for i in range(10)]
    skipped = {key: s.reason for key, s in samples if isinstance(s, Skipped)}
    assert skipped == {"k3": "empty_caption", "k7": "missing_file"}
    assert [red(image) for key, image in samples if key not in skipped] == [
        i for i in range(10) if i not in (3, 7)
    ]
    captions = [c for unit in cut for c in unit.captions()]  # images unread: k7's caption too
    assert captions == [[] if i == 3 else [f"caption {i}"] for i in range(10)]
    assert len({repr(u.identity()) for u in cut}) == 3  # each chunk names its own rows


def test_a_table_of_fewer_rows_than_a_chunk_is_one_unit(table):
    (unit,) = dataset_units(table)
    assert (unit.start, unit.size) == (0, 10) and units_module.TABLE_CHUNK > 10


def test_shards_are_one_unit_each_starting_at_their_first_row(tmp_path):
    folder = write_shards(tmp_path / "s", [3, 4], stray=True)  # shard 1 has an image-less key
    cut = dataset_units(folder)
    assert all(isinstance(u, ShardUnit) for u in cut)
    assert [(u.start, u.size) for u in cut] == [(0, 3), (3, 5)]
    second = list(cut[1].samples())
    assert [key for key, _ in second] == ["k0003", "k0004", "k0005", "k0006", "orphan"]
    orphan = second[-1][1]
    assert isinstance(orphan, Skipped) and orphan.reason == "no_image"
    assert orphan.id == f"{cut[1].path}/orphan"  # named by shard and key
    assert [red(image) for _, image in second[:-1]] == [3, 4, 5, 6]
    assert list(cut[1].captions())[-1] == ["a caption without an image"]
    assert cut[0].identity() != cut[1].identity()


def test_image_files_are_keyed_by_their_paths_as_given(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        (tmp_path / f"{i}.png").write_bytes(encoded(rgb(i + 20)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    unit = FilesUnit((*paths, str(tmp_path / "broken.png")))
    assert unit.size == 4 and unit.start == 0
    samples = list(unit.samples())
    assert [key for key, _ in samples] == [*paths, str(tmp_path / "broken.png")]
    assert [red(image) for _, image in samples[:3]] == [20, 21, 22]
    assert samples[3][1].reason == "undecodable_image"
    assert samples[3][1].id == str(tmp_path / "broken.png")


def test_a_files_units_identity_follows_its_files_and_their_spelling(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(encoded(rgb(1)))
    unit = FilesUnit((str(path),))
    first = unit.identity()
    assert FilesUnit((str(path),)).identity() == first
    monkeypatch.chdir(tmp_path)
    assert FilesUnit(("a.png",)).identity() != first  # other keys: another unit
    path.write_bytes(encoded(rgb(2)) + b"\0")  # the file changed (size and time)
    os.utime(path, ns=(1, 1))
    assert unit.identity() != first


def test_units_pickle_for_worker_processes(table, tmp_path):
    for unit in (*dataset_units(table), *dataset_units(write_shards(tmp_path / "s", [2]))):
        again = pickle.loads(pickle.dumps(unit))
        assert again.identity() == unit.identity()
        assert [key for key, _ in again.samples()] == [key for key, _ in unit.samples()]
