"""`train.parallel: fsdp` under torchrun: two gloo ranks holding shards of the weights,
gradients and Adam's state train the weights of one process (with micro-batches and
checkpointed blocks); each rank writes its shard of a checkpoint, which resumes on another
number of ranks, resharded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.trainer.test_ddp_train import STEPS, torchrun, train_records, weights, write_table
from tests.trainer.test_ddp_train import write_config as write_ddp_config
from threetowers.config import load_config
from threetowers.files.checkpoints import checkpoint_path, load_latest
from threetowers.trainer.loop import train

CLOSE = {"rtol": 1e-4, "atol": 1e-4}  # as DDP's two ranks (test_ddp_train.py says why)


def write_config(root: Path, table: Path, **changes) -> Path:
    """test_ddp_train's 3t config (h live) with train.parallel=fsdp."""
    config = yaml.safe_load(write_ddp_config(root, table).read_text())
    config["train"].update(parallel="fsdp", **changes)
    path = root / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    # micro-batches of 3 rows: 3, 1 on each rank's 4; 3, 3, 2 in one process
    table = write_table(root / "data")
    config = write_config(root, table, micro_batch=3, activation_checkpointing=True)
    single = train(load_config(config), root / "single", progress=False)
    torchrun(config, root / "ranks")
    return {"config": config, "single": single, "ranks": root / "ranks"}


def assert_same_weights(got: Path, expected: Path) -> None:
    mine, theirs = weights(got), weights(expected)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], **CLOSE, msg=key)


def test_two_sharded_ranks_train_the_weights_of_one_process(runs):
    assert_same_weights(runs["ranks"], runs["single"])
    single, ranks = train_records(runs["single"]), train_records(runs["ranks"])
    for mine, theirs in zip(
        [r for r in ranks if "loss" in r], [r for r in single if "loss" in r], strict=True
    ):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


def test_each_rank_writes_its_shard_and_the_checkpoint_checks_them_all(runs):
    folder = checkpoint_path(runs["ranks"] / "checkpoints", STEPS)
    shards = sorted(path.name for path in (folder / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    recorded = load_latest(runs["ranks"] / "checkpoints").meta["sha256"]
    assert {f"sharded/{name}" for name in [*shards, ".metadata"]} <= recorded.keys()
    broken = (folder / "sharded" / "__1_0.distcp").read_bytes()
    copy = runs["ranks"].parent / "broken"
    shutil.copytree(runs["ranks"], copy)
    shard = checkpoint_path(copy / "checkpoints", STEPS) / "sharded" / "__1_0.distcp"
    shard.write_bytes(broken[:-1] + bytes([broken[-1] ^ 1]))
    with pytest.warns(UserWarning, match="__1_0.distcp does not match its checksum"):
        assert load_latest(copy / "checkpoints").step == STEPS // 2  # the one before


def resumed(run: Path, into: Path) -> Path:
    """A copy of ``run`` as a crash after its middle checkpoint leaves it."""
    shutil.copytree(run, into)
    shutil.rmtree(checkpoint_path(into / "checkpoints", STEPS))
    (into / "eval.json").unlink()
    return into


def test_a_two_rank_run_resumes_in_one_process_resharded(runs, tmp_path):
    run = resumed(runs["ranks"], tmp_path / "ranks")
    train(load_config(runs["config"]), run, progress=False)
    assert_same_weights(run, runs["ranks"])
    assert [r["step"] for r in train_records(run) if "loss" in r] == list(range(1, STEPS + 1))


def test_a_one_process_run_resumes_on_two_ranks_resharded(runs, tmp_path):
    run = resumed(runs["single"], tmp_path / "single")
    torchrun(runs["config"], run)
    assert_same_weights(run, runs["single"])
    assert [r["step"] for r in train_records(run) if "loss" in r] == list(range(1, STEPS + 1))
