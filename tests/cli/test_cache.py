"""`threetowers cache` (cli/commands.py): the frozen towers run on train.device, and under
torchrun every rank computes its share of the units, into the cache one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.runs import tiny_run_config, write_config
from threetowers.cli import main
from threetowers.config import load_config
from threetowers.data.sources.pairs import iter_pairs
from threetowers.data.transforms import eval_transform
from threetowers.model.build import build_frozen_towers


def lit_config(world: Path, cache: Path, *overrides: str) -> Path:
    cfg = tiny_run_config(world, cache, "model.mode=lit", *overrides)
    return write_config(cfg, cache.with_suffix(".yaml"))


def cache_files(folder: Path) -> dict[str, bytes]:
    """The feature caches' files by name (not the locks, which hold their writers' pids, nor
    the shards' counts kept beside them)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".lock" and not p.name.startswith("shard_counts-")
    }


def test_cache_runs_the_towers_on_train_device(world_dir, tmp_path, capsys):
    config = lit_config(world_dir, tmp_path / "cache", "train.device=cpu")
    assert main(["cache", str(config)]) == 0
    assert "256 feature vectors of dim 1280 (float16)" in capsys.readouterr().out
    (h,) = build_frozen_towers(load_config(config).model).values()
    pair = next(iter_pairs(sorted((world_dir / "pairs").glob("train-*.tar"))))
    (row,) = [  # the world's keys are unique: one unit holds the first pair
        np.load(index.with_suffix(".npy"))[keys.index(pair.key)]
        for index in (tmp_path / "cache").glob("efficientnet_lite0-*/*.json")
        if pair.key in (keys := json.loads(index.read_text())["keys"])
    ]
    with torch.no_grad():
        live = h(eval_transform(h.preprocessing)(pair.image)[None])[0]
    # float16 rows: within one float16 step (1/1024 relative) of the live tower
    torch.testing.assert_close(torch.from_numpy(row).float(), live, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_cache_on_cuda_without_a_gpu_is_one_message(world_dir, tmp_path, capsys):
    config = lit_config(world_dir, tmp_path / "cache", "train.device=cuda")
    assert main(["cache", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        "threetowers cache: error: train.device=cuda but no CUDA device is visible; use "
        "train.device=auto"
    )


def run(command: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_ranks_build_the_cache_one_process_builds(tmp_path):
    """Under torchrun (rank 0 writes the embedded world first), one report."""
    ranks = lit_config(tmp_path / "world", tmp_path / "ranks", "train.device=cpu")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    out = run([*torchrun, "--nproc_per_node=2", "-m", "threetowers", "cache", str(ranks)])
    assert out.count("feature vectors of dim 1280") == 1
    one = lit_config(tmp_path / "world", tmp_path / "one", "train.device=cpu")
    run([sys.executable, "-m", "threetowers", "cache", str(one)])
    built, expected = cache_files(tmp_path / "ranks"), cache_files(tmp_path / "one")
    assert len(expected) == 2 * 4  # a .npy and a .json for each of the world's 4 shards
    assert built == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cache_on_cuda_in_bf16_is_a_cache_of_its_own_near_fp32(world_dir, tmp_path):
    fp32 = lit_config(world_dir, tmp_path / "fp32", "train.device=cuda")
    bf16 = lit_config(world_dir, tmp_path / "bf16", "train.device=cuda")
    assert main(["cache", str(fp32)]) == 0
    assert main(["cache", str(bf16), "data.cache_precision=bf16"]) == 0
    (exact,) = (tmp_path / "fp32").glob("efficientnet_lite0-*")
    (half,) = (tmp_path / "bf16").glob("efficientnet_lite0-*")
    assert exact.name != half.name  # never read as the fp32 cache
    for index in exact.glob("*.json"):
        rows = torch.from_numpy(np.load(index.with_suffix(".npy"))).float()
        autocast = torch.from_numpy(np.load(half / index.with_suffix(".npy").name)).float()
        assert not torch.equal(rows, autocast)
        # bf16 keeps ~3 significant digits: every row points where its fp32 row does
        assert torch.nn.functional.cosine_similarity(autocast, rows).min() > 0.995
