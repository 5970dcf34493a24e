"""A run's start: every path checked before any long work, and a failed start leaves the run
directory free for the corrected command."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.runs import clip_run_config, tiny_run_config
from threetowers.cli import main
from threetowers.data import pipeline
from threetowers.trainer.loop import train


def train_args(config, run, *overrides: str) -> list[str]:
    return ["train", str(config), "--run-dir", str(run), "--quiet", *overrides]


def wrong_paths(tmp_path) -> dict[str, tuple[str, str]]:
    """An override naming a missing path, and the message of its error."""
    return {
        "eval.retrieval": (
            f"eval.retrieval={tmp_path}/flickr.json",
            f"eval.retrieval: Karpathy split file not found: {tmp_path}/flickr.json; give a "
            "Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json), or leave "
            "eval.retrieval unset",
        ),
        "data.train": (
            f"data.train={tmp_path}/pairs.csv",
            f"data.train: pairs file not found: {tmp_path}/pairs.csv; set data.train to a "
            ".csv/.tsv/.jsonl file, a directory of .tar or .parquet shards or a quoted shard "
            "pattern, or leave it unset for the embedded world",
        ),
        "eval.zeroshot": (
            f"eval.zeroshot.objects={tmp_path}/classes",
            f"eval.zeroshot.objects: class folder root not found: {tmp_path}/classes/test; give "
            "a folder of class folders (ROOT/test/CLASS/*.jpg), or remove eval.zeroshot.objects",
        ),
        "train.init_from": (
            f"train.init_from={tmp_path}/run0",
            f"train.init_from: {tmp_path}/run0 is neither a run directory nor a checkpoint of "
            f"one (no config.yaml in {tmp_path}/run0); pass the directory that `threetowers "
            "train` wrote",
        ),
    }


@pytest.mark.parametrize("key", ["eval.retrieval", "data.train"])
def test_the_corrected_command_of_a_failed_start_runs_in_the_same_directory(
    world_dir,  # noqa: F811
    tmp_path,
    capsys,
    key,
):
    _, config = clip_run_config(world_dir, tmp_path, "train.steps=2")
    run = tmp_path / "run"
    override, message = wrong_paths(tmp_path)[key]
    assert main(train_args(config, run, override)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"threetowers train: error: {message}"]
    assert [p.name for p in run.iterdir()] == [".lock"]  # nothing recorded
    assert main(train_args(config, run)) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


@pytest.mark.parametrize("key", ["eval.retrieval", "eval.zeroshot", "train.init_from"])
def test_every_path_is_checked_before_any_long_work(
    world_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    key,
):
    def long_work(*args, **kwargs):
        raise AssertionError("long work started")

    monkeypatch.setattr(pipeline.CaptionTokenizer, "train", long_work)
    monkeypatch.setattr(pipeline, "build_dataset_caches", long_work)
    _, config = clip_run_config(world_dir, tmp_path, "train.steps=2")
    override, message = wrong_paths(tmp_path)[key]
    assert main(train_args(config, tmp_path / "run", override)) == 2
    *logged, error = capsys.readouterr().err.strip().splitlines()
    assert error == f"threetowers train: error: {message}"
    # the embedded world's retrieval sets, found before its zero-shot root was not
    assert all(line.startswith("threetowers: dataset_world") for line in logged)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_run_without_a_checkpoint_takes_another_config_and_trains_its_own_tokenizer(
    world_dir,  # noqa: F811
    tmp_path,
):
    cache = tmp_path / "cache"
    run = train(
        tiny_run_config(world_dir, cache, "model.mode=clip", "train.steps=1"),
        tmp_path / "run",
        progress=False,
    )
    first = (run / "tokenizer.json").read_bytes()
    assert len(json.loads(first)["model"]["vocab"]) > 200
    shutil.rmtree(run / "checkpoints")  # as if stopped before its first checkpoint
    other = tiny_run_config(
        world_dir, cache, "model.mode=clip", "train.steps=1", "model.text.vocab_size=200"
    )
    train(other, run, progress=False)
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    assert (run / "tokenizer.json").read_bytes() != first
    assert len(tokenizer["model"]["vocab"]) <= 200
    assert (run / "config.yaml").read_text().count("vocab_size: 200") == 1
