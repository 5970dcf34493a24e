"""``threetowers export --format open_clip``, verified in OpenCLIP itself.

OpenCLIP cannot live in the project's environment (it needs torchvision); `make test-interop`
builds a separate one (tests/interop/build_env.sh) and names its interpreter in
THREETOWERS_INTEROP_PYTHON. For each exportable pooling pair a tiny run is trained,
exported and loaded there with ``create_model_and_transforms("local-dir:DIR")``: its image
and text embeddings, its token ids and the world's zero-shot and retrieval numbers computed
from its embeddings must match ours and ``threetowers eval``'s; the folder read back natively
as a frozen pair must give OpenCLIP's embeddings too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.runs import tiny_run_config
from threetowers.backbones.trained_pair import load_open_clip_pair
from threetowers.cli import main
from threetowers.data.transforms import eval_transform
from threetowers.evaluation import metrics
from threetowers.evaluation.benchmark_sets import metric_names, resolve_benchmarks
from threetowers.evaluation.embedding import embed_images, embed_texts
from threetowers.model.objective import MAIN_TERM
from threetowers.model.trained import load_trained
from threetowers.project.world.default import ensure_world
from threetowers.trainer.loop import train
from threetowers.trainer.trained import evaluate_trained

pytestmark = pytest.mark.interop

# The exportable image poolings (OpenCLIP's tok and avg) with its one exact text pooling
# (causal, end-of-text), one per loss kind so that logit_bias is covered too.
RUNS = {
    "cls-eot-clip-softmax": ["model.mode=clip", "model.image.pool=cls"],
    "gap-eot-3t-sigmoid": [
        "model.mode=3t",
        "model.image.pool=gap",
        "model.image.class_token=true",
        "loss.kind=sigmoid",
    ],
}
WORLD = {"retrieval_test": 200, "zeroshot_per_class": 20}
# Beyond the world's captions: what a user's captions hold (case, unicode that NFKC folds,
# punctuation, extra spaces, a caption longer than the context).
EXTRA_CAPTIONS = [
    "A RED Star beside a blue ring.",
    "two  big\tgreen squares, near the tower!",
    "ﬁve small crosses (one yellow) - left of centre",
    "a " + "very " * 60 + "long caption about a purple moon",
    "café, naïve façade; 3 circles",
]


@pytest.fixture(scope="module")
def open_clip_python() -> str:
    python = os.environ.get("THREETOWERS_INTEROP_PYTHON")
    if not python:
        pytest.skip("needs OpenCLIP's environment: run `make test-interop`")
    return python


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interop") / "world"


def _config(world: Path, cache: Path, overrides: list[str]):
    return tiny_run_config(
        world,
        cache,
        "train.steps=30",
        "model.text.causal=true",
        "model.text.pool=eot",
        *[f"data.world.{key}={value}" for key, value in WORLD.items()],
        *overrides,
    )


def _open_clip_answer(python: str, export: Path, images: list[str], texts: list[str]) -> dict:
    request = export.parent / f"{export.name}-request.json"
    out = export.parent / f"{export.name}-answer.npz"
    request.write_text(
        json.dumps({"model": str(export), "images": images, "texts": texts, "out": str(out)})
    )
    side = Path(__file__).with_name("open_clip_side.py")
    done = subprocess.run([python, str(side), str(request)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as answer:
        return {key: answer[key] for key in answer.files}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_an_export_loads_in_open_clip_and_gives_our_embeddings_and_numbers(
    name, world, open_clip_python, tmp_path
):
    cfg = _config(world, tmp_path / "cache", RUNS[name])
    run_dir = train(cfg, tmp_path / "run", progress=False)
    export = tmp_path / "open_clip"
    assert main(["export", str(run_dir), "--format", "open_clip", "--out", str(export)]) == 0
    run = load_trained(run_dir)
    results, _ = evaluate_trained(run, run.cfg, None)
    benchmarks = resolve_benchmarks(run.cfg.eval, ensure_world(run.cfg.data.world)["benchmarks"])
    assert benchmarks.retrieval and benchmarks.zeroshot

    sets = [*benchmarks.retrieval.values(), *benchmarks.zeroshot.values()]
    images = list(dict.fromkeys(str(path) for s in sets for path in s.image_paths))
    # One image that OpenCLIP's preprocessing must resize: not square, not the tower's size.
    odd = tmp_path / "odd.png"
    Image.open(images[0]).resize((45, 71), Image.Resampling.BICUBIC).save(odd)
    images.append(str(odd))
    prompts = [
        template.format(c)
        for s in benchmarks.zeroshot.values()
        for c in s.class_names
        for template in s.templates
    ]
    retrieval_captions = [c for s in benchmarks.retrieval.values() for c in s.captions]
    texts = list(dict.fromkeys(retrieval_captions + prompts + EXTRA_CAPTIONS))
    theirs = _open_clip_answer(open_clip_python, export, images, texts)
    assert str(theirs["model_class"]) == "CLIP"

    # The tokenizer: the very ids, on every caption and prompt.
    assert len(texts) > 300
    np.testing.assert_array_equal(theirs["ids"], run.tokenizer.encode(texts).numpy())

    # The embeddings, within 1e-5, images through each side's own preprocessing.
    ours_images = embed_images(run.model, [Path(p) for p in images], batch_size=256)
    assert len(ours_images["index"]) == len(images)
    ours_texts = embed_texts(run.model, run.tokenizer, texts)
    np.testing.assert_allclose(theirs["images"], ours_images["z_f"].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(theirs["texts"], ours_texts["z_g"].numpy(), rtol=0, atol=1e-5)
    scale = run.model.loss_fn.scale(MAIN_TERM).item()
    assert float(theirs["logit_scale"]) == pytest.approx(scale, rel=1e-6)
    if run.cfg.loss.kind == "sigmoid":
        bias = run.model.loss_fn.bias[run.model.loss_fn.temperature_of[MAIN_TERM]].item()
        assert float(theirs["logit_bias"]) == pytest.approx(bias, rel=1e-6)
    else:
        assert np.isnan(theirs["logit_bias"])

    # The folder read back natively as a frozen pair (backbones/trained_pair.py, no
    # open_clip): OpenCLIP's own embeddings, as its encoders give them, images through the
    # pair's preprocessing.
    pair = load_open_clip_pair(export)
    view = eval_transform(pair.image.preprocessing)
    pair_images = pair.image(torch.stack([view(Image.open(path)) for path in images]))
    pair_texts = pair.text(texts)
    for key, ours in (("image_features", pair_images), ("text_features", pair_texts)):
        np.testing.assert_allclose(theirs[key], ours.numpy(), rtol=0, atol=1e-5)
    assert pair.scale == pytest.approx(float(theirs["logit_scale"]), rel=1e-6)

    # The world's numbers from OpenCLIP's vectors are `threetowers eval`'s.
    image_row = {path: i for i, path in enumerate(images)}
    text_row = {text: i for i, text in enumerate(texts)}
    image_vectors = torch.from_numpy(theirs["images"])
    text_vectors = torch.from_numpy(theirs["texts"])

    def encode(captions):
        return text_vectors[[text_row[c] for c in captions]]

    def embed(paths):
        return image_vectors[[image_row[str(p)] for p in paths]]

    checked = 0
    for position, (set_name, retrieval) in enumerate(benchmarks.retrieval.items()):
        scores = metrics.retrieval(
            embed(retrieval.image_paths), encode(retrieval.captions), retrieval.image_of_caption
        )
        named = metric_names("retrieval", set_name, position)
        for key, value in scores.items():
            assert value == results[named(key)], (named(key), value, results[named(key)])
            checked += 1
    for position, (set_name, dataset) in enumerate(benchmarks.zeroshot.items()):
        classes = metrics.class_embeddings(encode, dataset.class_names, dataset.templates)
        scores = metrics.zeroshot(embed(dataset.image_paths), classes, dataset.labels)
        named = metric_names("zeroshot", set_name, position)
        for key, value in scores.items():
            assert value == results[named(key)], (named(key), value, results[named(key)])
            checked += 1
    assert checked >= 10
    # Not a trivial model: the numbers compared are above chance.
    assert results["i2t_R@1"] > 100 / WORLD["retrieval_test"]
