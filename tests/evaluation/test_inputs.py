"""Cached evaluation inputs (decoded views, h's features) give the live embeddings exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import tiny_model
from tests.helpers.bad_data import encoded
from tests.helpers.images import image_folder, noise
from tests.helpers.world import TINY
from threetowers.config import EvalConfig
from threetowers.data.sources.bad_samples import BadSampleLog
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.evaluation.benchmark_sets import resolve_benchmarks
from threetowers.evaluation.embedding import embed_images
from threetowers.evaluation.inputs import EvalCache
from threetowers.evaluation.suite import evaluate_model
from threetowers.project.world.generate import benchmark_files, write_world

CACHES = {  # what is cached: data.preload (pixels), data.cache (h's features)
    "pixels+features": (True, True),
    "pixels": (True, False),
    "features": (False, True),
}


def embedded(model, paths, cache):
    log = BadSampleLog(1.0, "evaluation images")
    out = embed_images(model, paths, batch_size=4, bad_images=log, cache=cache)
    return out, (log.seen, dict(log.counts), log.examples)


def assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def fail(*args, **kwargs):
    raise AssertionError("read live although it is cached")


@pytest.mark.parametrize("cached", CACHES.values(), ids=CACHES.keys())
@pytest.mark.parametrize("mode", ["clip", "lit", "3t"])
def test_cached_inputs_give_the_live_embeddings_and_skip_the_same_images(
    tmp_path, monkeypatch, mode, cached
):
    paths = image_folder(tmp_path / "images")  # 13 usable, 4 bad and 1 missing file
    model = tiny_model(mode).eval()
    cache = EvalCache(str(tmp_path / "cache"), *cached)
    live, live_bad = embedded(model, paths, None)
    assert len(live["index"]) == len(paths) - 5 and live_bad[1]["undecodable_image"] == 3
    built, built_bad = embedded(model, paths, cache)
    assert_same(built, live)
    assert built_bad == live_bad

    # read back: with views and features cached, no image is decoded and h never runs
    if cache.pixels and cache.features:
        monkeypatch.setattr("threetowers.data.benchmarks.load_image", fail)
        for tower in model.frozen.values():
            monkeypatch.setattr(tower, "forward", fail)
    again, again_bad = embedded(model, paths, cache)
    assert_same(again, live)
    assert again_bad == live_bad


def test_an_edited_benchmark_image_is_not_served_from_the_cache(tmp_path):
    paths = image_folder(tmp_path / "images")
    model = tiny_model("3t").eval()
    cache = EvalCache(str(tmp_path / "cache"), True, True)
    before, _ = embedded(model, paths, cache)
    edited = next(path for path in paths if path.name == "noise0.png")
    edited.write_bytes(encoded(noise(40, 30, 123)))  # another size: another file size
    after, _ = embedded(model, paths, cache)
    assert_same(after, embedded(model, paths, None)[0])
    row = before["index"].tolist().index(paths.index(edited))
    for key in ("z_f", "z_h"):
        assert not torch.equal(after[key][row], before[key][row])


def test_evaluation_with_the_cache_scores_exactly_as_without(tmp_path):
    world_dir = tmp_path / "world"
    shutil.copytree(write_world(tmp_path / "generated", TINY).parent, world_dir)
    broken = sorted((world_dir / "zeroshot_objects" / "test").rglob("*.png"))[3]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    benchmarks = resolve_benchmarks(EvalConfig(), benchmark_files(world_dir))
    captions = benchmarks.retrieval["world"].captions
    tokenizer = CaptionTokenizer.train(captions, vocab_size=512, context_length=16)
    model = tiny_model("3t")
    cache = EvalCache(str(tmp_path / "cache"), True, True)
    live = evaluate_model(model, tokenizer, benchmarks, EvalConfig(batch_size=4), tmp_path / "a")
    for attempt in ("b", "c"):  # building the cache, then reading it
        scores = evaluate_model(
            model, tokenizer, benchmarks, EvalConfig(batch_size=4), tmp_path / attempt, cache=cache
        )
        assert scores == live
        assert (tmp_path / attempt / "eval.json").read_text() == (
            tmp_path / "a/eval.json"
        ).read_text()
    assert live["skipped_images"] == 1 and "fewshot_top1" in live and live["alpha_sweep"]
    assert list((tmp_path / "cache").glob("images-*.u8"))
    assert list((tmp_path / "cache").glob("*-eval-*/*.npy"))
