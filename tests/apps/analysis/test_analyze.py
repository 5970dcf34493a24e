"""``threetowers analyze``: the world's attributes against its files, the probes, and the
command on a tiny trained 3T run, a frozen pair's own embeddings by its name (linear CKA
itself: test_cka.py)."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.cka import cka_by_definition
from tests.helpers.pair_models import CAPTIONS
from tests.helpers.pair_parts import own_embeddings, pair_model, square_images
from tests.helpers.runs import tiny_run_config
from threetowers.apps.analysis.analyze import analyze, embeddings, labels, probe_accuracy
from threetowers.apps.analysis.attributes import ATTRIBUTES, Samples, world_samples
from threetowers.cli import main
from threetowers.data.benchmarks import load_karpathy
from threetowers.evaluation.embedding import embed_images
from threetowers.model.trained import TrainedRun, load_trained
from threetowers.trainer.loop import train


def test_probe_ignores_undefined_labels_and_counts_unseen_ones_as_errors():
    rng = np.random.default_rng(1)
    centres = {"a": (5.0, 0.0), "b": (0.0, 5.0), "c": (-5.0, -5.0)}
    names = ["a", "b"] * 20 + [None] * 5
    points = [centres[n] if n else (100.0, 100.0) for n in names]
    train = torch.tensor(np.array(points) + 0.1 * rng.normal(size=(45, 2)))
    test_names = ["a", "b", "c", None]
    test = torch.tensor([centres[n] if n else (0.0, 0.0) for n in test_names])
    # a and b right, c (never seen in training) wrong, None not scored
    assert probe_accuracy(train, names, test, test_names) == pytest.approx(200 / 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    cfg = tiny_run_config(root / "world", root / "cache", "train.steps=3")
    return load_trained(train(cfg, root / "run", progress=False)), root


def test_world_samples_are_the_stored_images_with_their_attributes(trained):
    run, root = trained
    samples = world_samples(run.cfg.data.world, ("retrieval_test",))
    retrieval = load_karpathy(root / "world" / "retrieval" / "dataset_world.json", split="test")
    assert len(samples) == len(retrieval.image_paths) == 40
    for image, path, caption, first in zip(
        samples.images,
        retrieval.image_paths,
        samples.captions,
        retrieval.captions[:: len(retrieval.captions) // 40],
        strict=True,
    ):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))
        assert caption == first
    counts = samples.attributes["count"]
    for attribute in ("object class", "colour", "size", "position"):
        defined = [value is not None for value in samples.attributes[attribute]]
        assert defined == [count == "1" for count in counts]
    # the val pairs' shard stores its metadata: the rendered attributes are those
    val = world_samples(run.cfg.data.world, ("val",))
    with tarfile.open(root / "world" / "pairs" / "val-000000.tar") as tar:
        records = [
            json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")
        ]
    assert len(records) == len(val) == 32
    for i, record in enumerate(records):
        assert val.attributes["count"][i] == str(record["count"])
        assert val.attributes["place"][i] == record["place"]
        assert val.captions[i] == record["captions"][0]
        if record["count"] == 1:
            (thing,) = record["objects"]
            assert val.attributes["object class"][i] == thing["class"]
            assert [val.attributes[a][i] for a in ("colour", "size", "position")] == [
                thing["colour"],
                thing["size"],
                thing["position"],
            ]


def test_analyze_compares_the_run_s_own_embeddings(trained, tmp_path):
    run, root = trained
    image, text = labels(run.model)
    assert list(image.values()) == ["z_f", "z_f->h", "z_h"]
    assert list(text.values()) == ["z_g", "z_g->h"]
    # the embeddings analysed are the evaluation's own of the same files
    samples = world_samples(run.cfg.data.world, ("retrieval_test",))
    vectors = embeddings(run, samples, batch_size=16)
    retrieval = load_karpathy(root / "world" / "retrieval" / "dataset_world.json", split="test")
    reference = embed_images(run.model, retrieval.image_paths, batch_size=16)
    for key, name in image.items():
        torch.testing.assert_close(vectors[name], reference[key], atol=1e-5, rtol=0)
    results = analyze(run.run_dir, tmp_path / "out", batch_size=16)
    names = ["z_f", "z_f->h", "z_h", "z_g", "z_g->h"]
    assert list(results["cka"]) == names
    for a in names:
        assert results["cka"][a][a] == pytest.approx(1.0)
        for b in names:
            assert results["cka"][a][b] == pytest.approx(results["cka"][b][a])
            assert results["cka"][a][b] == pytest.approx(
                cka_by_definition(vectors[a].double().numpy(), vectors[b].double().numpy()),
                rel=1e-6,
            )
    assert list(results["probes"]) == ["z_f", "z_f->h", "z_h"]
    for scores in results["probes"].values():
        assert set(scores) == set(ATTRIBUTES) and all(0 <= s <= 100 for s in scores.values())
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved["probes"] == results["probes"]
    assert (tmp_path / "out" / "analysis.png").stat().st_size > 0


def test_analyze_command_prints_the_matrix_and_probes(trained, capsys):
    run, _ = trained
    main(["analyze", str(run.run_dir)])
    printed = capsys.readouterr().out
    assert "linear CKA" in printed and "majority" in printed and "z_g->h" in printed
    assert (run.run_dir / "analysis" / "analysis.json").is_file()


def test_a_frozen_pairs_own_embeddings_are_analysed_under_its_name(tmp_path):
    built = pair_model(tmp_path / "clip")
    image, text = labels(built.model)
    assert list(image.values()) == [
        "z_f",
        "z_f->h",
        "z_f->timg",
        "z_f->ttxt",
        "z_h",
        "z_timg",
        "t own image",
    ]
    assert list(text.values()) == ["z_g", "z_g->h", "z_g->timg", "z_ttxt", "t own text"]
    paths = square_images(tmp_path / "images", 4)
    samples = Samples([Image.open(path).convert("RGB") for path in paths], CAPTIONS, {})
    run = TrainedRun(tmp_path / "run", built.cfg, built.model, built.tokenizer, 0, "pair-run")
    vectors = embeddings(run, samples, batch_size=4)
    own_images, own_texts = own_embeddings(built, paths, CAPTIONS)
    torch.testing.assert_close(vectors["t own image"], own_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(vectors["t own text"], own_texts, atol=1e-5, rtol=0)
