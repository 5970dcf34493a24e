"""Several weighted training sources, resampled: counted per source, resumed exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.http_server import Server
from tests.helpers.runs import (
    TRAIN_ENV,
    final_weights,
    tiny_run_config,
    train_command,
    write_config,
)
from threetowers.project.world.default import ensure_world


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    world = tmp_path_factory.mktemp("world")
    ensure_world(tiny_run_config(world, world / "cache").data.world)
    return world


def two_sources(world_dir: Path, tmp_path: Path, small: str, big: str, *overrides: str) -> Path:
    """A config drawing two sources 1 : 3 with replacement (of the tiny world's 4 train
    shards: ``small`` spells its first, ``big`` the other three)."""
    sources = [
        {"name": "small", "source": small, "weight": 1},
        {"name": "big", "source": big, "weight": 3},
    ]
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        f"data.train={json.dumps(sources)}",
        "data.resampled=true",
        "model.mode=clip",
        *overrides,
    )
    return write_config(cfg, tmp_path / "run.yaml")


LOCAL = ("pairs/train-000000.tar", "pairs/train-{000001..000003}.tar")


def last_record(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line][-1]


def test_samples_by_source_follow_the_weights_over_http_and_pipe(world_dir, tmp_path):
    server = Server(world_dir)  # the big source over loopback HTTP, the small through cat
    try:
        small = f"pipe:cat {world_dir / LOCAL[0]}"
        big = f"{server.url}/{LOCAL[1]}"
        steps = ("train.steps=40", "data.num_workers=2")
        config = two_sources(world_dir, tmp_path, small, big, *steps)
        env = TRAIN_ENV | {"THREETOWERS_COUNT_CACHE": str(tmp_path / "counts")}
        subprocess.run(train_command(config, tmp_path / "run"), check=True, env=env)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert server.gets(".tar") > 0
    record = last_record(tmp_path / "run")
    small, big = record["data/source/small/samples"], record["data/source/big/samples"]
    assert small + big == record["data/samples"] == 40 * 32
    # whole shards of 64 samples are drawn: the share moves in steps of 5 points here
    assert big / (small + big) == pytest.approx(0.75, abs=0.1)
    assert record["data/source/small/bad_samples"] == record["data/source/big/bad_samples"] == 0


def test_a_resampled_run_killed_resumes_to_the_uninterrupted_weights(world_dir, tmp_path):
    local = [str(world_dir / name) for name in LOCAL]
    steps = ("train.steps=24", "train.checkpoint_every=4", "data.num_workers=2")
    config = two_sources(world_dir, tmp_path, *local, *steps)
    subprocess.run(train_command(config, tmp_path / "straight"), check=True, env=TRAIN_ENV)
    run = tmp_path / "killed"
    process = subprocess.Popen(train_command(config, run), env=TRAIN_ENV)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_00000008").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run(train_command(config, run), check=True, env=TRAIN_ENV)
    expected, got = final_weights(tmp_path / "straight"), final_weights(run)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert last_record(run) == last_record(tmp_path / "straight") | {
        "pairs_per_s": last_record(run)["pairs_per_s"]
    }
