"""Two gloo ranks build a dataset's image and caption caches at once: every unit computed
once, by rank i mod 2, the cache's files and fingerprints those of one process's build."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_backbone
from tests.helpers.shards import SHARD_SIZES, write_shards
from threetowers.data.caches import sharded
from threetowers.data.caches import units as cached
from threetowers.data.caches.layout import CacheSpec
from threetowers.data.caches.sharded import build_dataset_caches
from threetowers.data.caches.units import dataset_units

WORLD = 2
SIZES = SHARD_SIZES[:5]  # five units: rank 0 computes three, rank 1 two


def build(images, texts, data: Path, cache: Path):
    spec = CacheSpec(cache, "float32")
    return build_dataset_caches(images, texts, dataset_units(data), spec, 3, progress=False)


def fingerprints(caches) -> dict[str, str]:
    return {name: cache.fingerprint for part in caches for name, cache in part.items()}


def recording(log: Path):
    """ShardUnit's reads, each line the kind and the shard: what a build computed."""
    samples, captions = cached.ShardUnit.samples, cached.ShardUnit.captions

    def record(kind, read):
        def recorded(unit):
            with open(log, "a") as handle:
                handle.write(f"{kind} {Path(unit.path).name}\n")
            return read(unit)

        return recorded

    cached.ShardUnit.samples = record("image", samples)
    cached.ShardUnit.captions = record("caption", captions)


def run_rank(rank: int, init_file: str, towers, data: str, root: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        recording(Path(root) / f"computed{rank}.txt")
        caches = build(*towers, Path(data), Path(root) / "ranks")
        torch.save(fingerprints(caches), Path(root) / f"fingerprints{rank}.pt")
    finally:
        dist.destroy_process_group()


def files(folder: Path) -> dict[str, bytes]:
    """The cache's files by name (not the locks, which hold their writers' pids)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_text_encoder):
    root = tmp_path_factory.mktemp("sharded")
    data = write_shards(root / "data", SIZES)
    towers = ({"h": tiny_backbone()}, {"t": tiny_text_encoder})
    mp.spawn(run_rank, args=(str(root / "init"), towers, str(data), str(root)), nprocs=WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank computed
    try:
        single = fingerprints(build(*towers, data, root / "single"))
    finally:
        torch.set_num_threads(threads)
    return root, data, single


def test_each_unit_is_computed_once_by_the_rank_that_owns_it(builds):
    root, data, _ = builds
    shards = sorted(p.name for p in data.glob("*.tar"))
    for rank in range(WORLD):
        computed = (root / f"computed{rank}.txt").read_text().splitlines()
        mine = shards[rank::WORLD]
        assert sorted(computed) == sorted(
            f"{kind} {s}" for kind in ("image", "caption") for s in mine
        )


def test_the_ranks_cache_is_one_process_cache_byte_for_byte(builds):
    root, _, single = builds
    ranks, one = files(root / "ranks"), files(root / "single")
    assert len(one) == 2 * 2 * len(SIZES)  # two towers, a .npy and a .json per unit
    assert ranks.keys() == one.keys()
    for name, content in one.items():
        assert ranks[name] == content, name
    for rank in range(WORLD):
        assert torch.load(root / f"fingerprints{rank}.pt") == single


def test_units_another_machine_built_are_computed_here_with_a_warning(
    builds, tmp_path, monkeypatch, caplog
):
    """A rank whose cache_dir is its own disk: the other rank's units are absent after the
    meeting, so it computes them too, and says why."""
    _, data, single = builds
    monkeypatch.setattr(sharded.distributed, "world_size", lambda: WORLD)
    monkeypatch.setattr(sharded.distributed, "rank", lambda: 0)
    monkeypatch.setattr(sharded.distributed, "meet", lambda: None)
    towers = ({"h": tiny_backbone()}, {})
    with caplog.at_level(logging.WARNING, logger="threetowers"):
        caches = build(*towers, data, tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    assert f"{folder}: 2 of its 5 units, built by the other ranks, are absent here" in caplog.text
    assert len(list(folder.glob("*.json"))) == len(SIZES)
    assert caches[0]["h"].fingerprint == single["h"]
