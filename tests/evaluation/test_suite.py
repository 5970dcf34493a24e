"""evaluate_model over several named sets: the world's held-out sets beside its own."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_model
from tests.helpers.world import TINY
from threetowers.config import EvalConfig
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.evaluation import suite
from threetowers.evaluation.suite import chance_levels, evaluate_model, resolve_benchmarks
from threetowers.project.world.generate import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_world(tmp_path_factory.mktemp("world"), TINY).parent
    return json.loads((root / "manifest.json").read_text()) | {"root": str(root)}


def test_the_worlds_heldout_sets_are_scored_as_they_would_be_alone(world, monkeypatch):
    root = world["root"]
    cfg = EvalConfig(batch_size=8, fewshot_shots=0)
    benchmarks = resolve_benchmarks(cfg, world)
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
    single = evaluate_model(model, tokenizer, resolve_benchmarks(alone, world), alone)
    for key in ("i2t_R@1", "t2i_R@5", "zeroshot_top1"):
        named = key.replace("_R@", "_heldout_R@").replace("zeroshot", "zeroshot_heldout")
        assert every[named] == single[key]
    # the α-sweep names every set's metrics the same way
    row = every["alpha_sweep"][0]
    assert {"i2t_heldout_R@1", "zeroshot_heldout_top1", "zeroshot_places_top1"} <= set(row)
    chance = chance_levels(benchmarks)
    assert chance["zeroshot_heldout_top1"] == pytest.approx(100 / 12)
    assert chance["t2i_heldout_R@1"] == chance["t2i_R@1"]
