"""evaluate_model over several named sets: the world's held-out sets beside its own."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from tests.conftest import tiny_model
from tests.helpers.world import TINY
from threetowers.config import EvalConfig
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.evaluation import suite
from threetowers.evaluation.benchmark_sets import resolve_benchmarks
from threetowers.evaluation.chance import chance_levels
from threetowers.evaluation.suite import evaluate_model
from threetowers.project.world.generate import benchmark_files, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The world's root and its own benchmark sets."""
    root = write_world(tmp_path_factory.mktemp("world"), TINY).parent
    return root, benchmark_files(root)


def test_the_worlds_heldout_sets_are_scored_as_they_would_be_alone(world, monkeypatch):
    root, defaults = world
    cfg = EvalConfig(batch_size=8, fewshot_shots=0)
    benchmarks = resolve_benchmarks(cfg, defaults)
    assert list(benchmarks.retrieval) == ["world", "heldout"]
    assert list(benchmarks.zeroshot) == ["objects", "places", "heldout"]
    captions = benchmarks.retrieval["world"].captions
    tokenizer = CaptionTokenizer.train(captions, vocab_size=512, context_length=16)
    model = tiny_model("3t")
    calls = []
    embed_images = suite.embed_images
    monkeypatch.setattr(
        suite,
        "embed_images",
        lambda m, paths, *a: calls.append(len(paths)) or embed_images(m, paths, *a),
    )
    every = evaluate_model(model, tokenizer, benchmarks, cfg)
    # The held-out sets show the same images: embedded once (retrieval, objects, places).
    assert len(calls) == 3
    alone = EvalConfig(
        batch_size=8,
        fewshot_shots=0,
        retrieval=f"{root}/retrieval/dataset_world_heldout.json",
        zeroshot={"mine": f"{root}/zeroshot_objects_heldout"},
    )
    single = evaluate_model(model, tokenizer, resolve_benchmarks(alone, defaults), alone)
    for key in ("i2t_R@1", "t2i_R@5", "zeroshot_top1"):
        named = key.replace("_R@", "_heldout_R@").replace("zeroshot", "zeroshot_heldout")
        assert every[named] == single[key]
    # the α-sweep names every set's metrics the same way
    row = every["alpha_sweep"][0]
    assert {"i2t_heldout_R@1", "zeroshot_heldout_top1", "zeroshot_places_top1"} <= set(row)
    chance = chance_levels(benchmarks)
    assert chance["zeroshot_heldout_top1"] == pytest.approx(100 / 12)
    assert chance["t2i_heldout_R@1"] == chance["t2i_R@1"]


def test_eval_json_is_written_without_the_plots_extra(world, tmp_path, monkeypatch, caplog):
    """The α figure is a side product: without matplotlib it is skipped, in one line."""
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    root, _ = world
    retrieval = f"{root}/retrieval/dataset_world.json"
    cfg = EvalConfig(batch_size=8, fewshot_shots=0, retrieval=retrieval)
    benchmarks = resolve_benchmarks(cfg, None)
    captions = benchmarks.retrieval["retrieval"].captions
    tokenizer = CaptionTokenizer.train(captions, vocab_size=512, context_length=16)
    with caplog.at_level(logging.INFO, logger="threetowers"):
        results = evaluate_model(tiny_model("3t"), tokenizer, benchmarks, cfg, tmp_path)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["alpha_sweep"] == results["alpha_sweep"]
    assert not (tmp_path / "alpha_sweep.png").exists()
    assert sum("not drawn" in message for message in caplog.messages) == 1
