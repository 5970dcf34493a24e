"""train.init_from: a new run starts from another run's trained weights and tokenizer."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import threetowers as tt
from tests.helpers.runs import clip_run_config, final_weights, tiny_run_config
from threetowers.cli import main
from threetowers.trainer import loop, start
from threetowers.trainer.checkpoint import load_matching, trainable_state
from threetowers.trainer.loop import train

HEADS = ["heads.f.bias", "heads.f.weight", "heads.g.bias", "heads.g.weight"]


@pytest.fixture(scope="module")
def source(world_dir, tmp_path_factory):  # noqa: F811
    """A CLIP run of 4 steps (embed_dim 32), to start from."""
    out = tmp_path_factory.mktemp("source")
    cfg = tiny_run_config(world_dir, out / "cache", "model.mode=clip", "train.steps=4")
    return train(cfg, out / "run", progress=False)


def test_load_matching_loads_what_fits_and_names_the_rest():
    torch.manual_seed(0)
    trained = trainable_state(tt.build_model(tt.load_config("tiny", ["model.mode=clip"])))
    torch.manual_seed(1)
    model = tt.build_model(tt.load_config("tiny", ["model.mode=clip", "model.embed_dim=16"]))
    before = trainable_state(model)
    new, unused = load_matching(model, trained)
    assert new == unused == HEADS  # W_f and W_g map to 16 dimensions here, to 32 there
    after = trainable_state(model)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name] if name in HEADS else trained[name]), name


def test_a_run_started_from_another_starts_from_its_weights_and_tokenizer(
    world_dir,  # noqa: F811
    source,
    tmp_path,
    monkeypatch,
    caplog,
):
    start = {}
    make_optimizer = loop.make_optimizer

    def first_weights(model, *args):  # the model as the first step will find it
        start.update({k: v.clone() for k, v in trainable_state(model).items()})
        return make_optimizer(model, *args)

    monkeypatch.setattr(loop, "make_optimizer", first_weights)
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "model.mode=clip",
        "train.steps=2",
        "train.checkpoint_every=1",
        f"train.init_from={source}",
    )
    with caplog.at_level(logging.INFO, logger="threetowers"):
        run = train(cfg, tmp_path / "run", progress=False)
    trained = final_weights(source)
    assert start.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(start[name], tensor), name
    assert (run / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert (
        f"train.init_from: {len(trained)} tensors from step 4 of {source}; left new: none; "
        "not used: none"
    ) in caplog.messages
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # its own steps, from 0
    assert records[0]["lr"] == cfg.train.lr  # its own warmup: 2 steps

    # Its own checkpoints make it a run like any other: the same command resumes it, without
    # the run it started from.
    finished = final_weights(run)
    shutil.move(source, tmp_path / "moved")
    try:
        shutil.rmtree(run / "checkpoints" / "step_00000002")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="threetowers"):
            train(cfg, run, progress=False)
    finally:
        shutil.move(tmp_path / "moved", source)
    assert not [m for m in caplog.messages if m.startswith("train.init_from")]
    resumed = final_weights(run)
    for name, tensor in finished.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_checkpoint_of_another_shape_leaves_what_does_not_fit_new(
    world_dir,  # noqa: F811
    source,
    tmp_path,
    caplog,
):
    checkpoint = source / "checkpoints" / "step_00000004"
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "model.mode=clip",
        "model.embed_dim=16",
        "train.steps=1",
        f"train.init_from={checkpoint}",
    )
    with caplog.at_level(logging.INFO, logger="threetowers"):
        train(cfg, tmp_path / "run", progress=False)
    trained = final_weights(source)
    heads = ", ".join(HEADS)
    assert (
        f"train.init_from: {len(trained) - 4} tensors from step 4 of {checkpoint}; left new: "
        f"{heads}; not used: {heads}"
    ) in caplog.messages


def test_a_source_without_its_tokenizer_is_refused_before_any_work(
    world_dir,  # noqa: F811
    source,
    tmp_path,
    monkeypatch,
    capsys,
):
    copy = shutil.copytree(source, tmp_path / "source", ignore=shutil.ignore_patterns(".lock"))
    (copy / "tokenizer.json").unlink()

    def no_data_work(*args, **kwargs):
        raise AssertionError("the training data was opened")

    monkeypatch.setattr(start, "open_data", no_data_work)
    _, config = clip_run_config(world_dir, tmp_path, f"train.init_from={copy}")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"threetowers train: error: train.init_from: {copy}/tokenizer.json is missing, and the "
        "text tower's token ids mean its words; restore it, or set data.tokenizer to the "
        f"tokenizer {copy} was trained with"
    ]
