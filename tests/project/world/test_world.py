"""The embedded image-caption world: determinism, content, caption coverage, on-disk formats."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from tests.helpers.world import TINY
from threetowers.files.atomic import ForeignFolderError
from threetowers.project.world import captions as wc
from threetowers.project.world import render as wr
from threetowers.project.world.captions import captions
from threetowers.project.world.generate import STARTED, WorldSpecMismatch, write_world
from threetowers.project.world.render import COLOURS, OBJECT_CLASSES, PLACES, SCENES
from threetowers.project.world.spec import OBJECT_TEMPLATES, PLACE_TEMPLATES, WorldSpec, render

FOLDER_SETS = {  # dataset/part -> (split name, class names, images per class)
    "zeroshot_objects/test": ("zeroshot_objects_test", OBJECT_CLASSES, 2),
    "zeroshot_objects/val": ("zeroshot_objects_val", OBJECT_CLASSES, 1),
    "zeroshot_places/test": ("zeroshot_places_test", PLACES, 2),
    "zeroshot_places/val": ("zeroshot_places_val", PLACES, 1),
    "pretrain_objects/train": ("pretrain_objects_train", OBJECT_CLASSES, 2),
    "pretrain_objects/val": ("pretrain_objects_val", OBJECT_CLASSES, 1),
    "pretrain_scenes/train": ("pretrain_scenes_train", SCENES, 2),
    "pretrain_scenes/val": ("pretrain_scenes_val", SCENES, 1),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"), TINY).parent


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _mentions(text: str, phrases) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", text) for p in phrases)


def test_vocabulary_is_rich_enough():
    assert len(set(OBJECT_CLASSES)) >= 10
    assert len(set(COLOURS)) >= 6
    assert len(set(PLACES)) >= 8
    assert len(set(SCENES)) >= 24 and len(SCENES) == 3 * len(PLACES)
    assert len(OBJECT_TEMPLATES) >= 5 and len(PLACE_TEMPLATES) >= 5
    assert all("{}" in t for t in OBJECT_TEMPLATES + PLACE_TEMPLATES)


def test_render_is_deterministic_and_seeded():
    for split in ("train", "zeroshot_objects_test", "pretrain_scenes_train"):
        image, meta = render(TINY, split, 7)
        again, meta_again = render(TINY, split, 7)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert _png(image) == _png(again) and meta == meta_again
        other, other_meta = render(WorldSpec(seed=1), split, 7)
        assert not np.array_equal(_pixels(image), _pixels(other))
        if meta["captions"]:  # the labelled scenes hold landmarks, no objects to caption
            assert other_meta["captions"] != meta["captions"]
    # Different splits and indices are different streams.
    base = _pixels(render(TINY, "train", 0)[0])
    assert not np.array_equal(base, _pixels(render(TINY, "val", 0)[0]))
    assert not np.array_equal(base, _pixels(render(TINY, "train", 1)[0]))
    # Image size is a parameter; the layout and captions do not depend on it.
    small, small_meta = render(WorldSpec(image_size=32), "train", 3)
    assert small.size == (32, 32) and small_meta == render(TINY, "train", 3)[1]


def test_metadata_and_labels():
    for index in range(60):
        _, meta = render(TINY, "train", index)
        assert 1 <= meta["count"] == len(meta["objects"]) <= 3
        assert meta["scene"] in SCENES and SCENES.index(meta["scene"]) // 3 == PLACES.index(
            meta["place"]
        )
        cells = [o["position"] for o in meta["objects"]]
        assert len(set(cells)) == len(cells)  # distinct grid cells
        for obj in meta["objects"]:
            assert obj["class"] in OBJECT_CLASSES and obj["colour"] in COLOURS
            assert obj["size"] in ("small", "large") and obj["position"] in wr.POSITIONS
    for index in range(30):
        _, meta = render(TINY, "pretrain_objects_train", index)
        assert meta["count"] == 1 and meta["objects"][0]["class"] == OBJECT_CLASSES[meta["label"]]
        _, meta = render(TINY, "zeroshot_places_test", index)
        assert meta["place"] == PLACES[meta["label"]] == PLACES[index % len(PLACES)]
        _, meta = render(TINY, "pretrain_scenes_train", index)
        # the scene's place in any variant: only the landmark tells the label
        assert meta["label"] == index % len(SCENES) and meta["objects"] == []
        assert SCENES.index(meta["scene"]) // 3 == meta["label"] // 3


def test_landmarks_tell_the_scenes_of_a_place_apart_and_are_never_objects():
    assert not set(wr.LANDMARKS) & set(OBJECT_CLASSES)
    landmarks = [wr.landmark_of(scene) for scene in range(len(SCENES))]
    for place in range(len(PLACES)):
        assert len(set(landmarks[3 * place : 3 * place + 3])) == 3
    assert sorted(landmarks) == sorted(list(wr.LANDMARKS) * 3)
    # the landmark is drawn: two labels of one place differ where the background is the same
    image = wr.compose(np.random.default_rng(0), random.Random(0), 64, 0, [])
    obj = {"class": wr.landmark_of(0), "colour": "red", "size": "large", "position": "centre"}
    drawn = wr.compose(np.random.default_rng(0), random.Random(0), 64, 0, [obj])
    assert (_pixels(drawn) != _pixels(image)).any(axis=-1).sum() > 100


def test_captions_name_classes_and_cover_what_labels_ignore():
    lengths = []
    for index in range(150):
        _, meta = render(TINY, "train", index)
        texts = meta["captions"]
        assert len(texts) == TINY.captions_per_image and len(set(texts)) > 1
        classes = [w for o in meta["objects"] for w in wc.CLASS_WORDS[o["class"]]]
        for text in texts:
            assert text == text.strip() and text.islower() and "  " not in text
            assert _mentions(text, classes), (text, meta["objects"])
            lengths.append(len(text.split()))
        union = " | ".join(texts)
        assert meta["place"] in union or meta["scene"] in union
        for obj in meta["objects"]:
            assert _mentions(union, wc.COLOUR_WORDS[obj["colour"]])
            assert _mentions(union, wc.SIZE_WORDS[obj["size"]])
            assert _mentions(union, wc.POSITION_PHRASES[obj["position"]])
    assert 4 < np.mean(lengths) < 25
    # The function itself: any count, numpy or Python RNG, deterministic given the RNG.
    _, meta = render(TINY, "val", 0)
    assert captions(meta, np.random.default_rng(3), 7) == captions(
        meta, np.random.default_rng(3), 7
    )
    assert len(captions(meta, random.Random(0), 1)) == 1


def test_object_colours_stand_out_from_every_background():
    for scene in range(len(SCENES)):
        for colour in COLOURS:
            obj = {"class": "square", "colour": colour, "size": "large", "position": "centre"}
            rng = np.random.default_rng([scene, len(colour)])
            image, mask = wr.compose(rng, random.Random(scene), 64, scene, [obj], with_mask=True)
            pixels, inside = _pixels(image).astype(float), np.asarray(mask) > 0
            assert 100 < inside.sum() < 64 * 64 / 4
            gap = np.linalg.norm(pixels[inside].mean(0) - pixels[~inside].mean(0))
            assert gap > 60, (SCENES[scene], colour, gap)


def test_shapes_differ_and_objects_never_overlap():
    masks = []
    for name in OBJECT_CLASSES:
        mask = Image.new("L", (64, 64))
        obj = {"class": name, "colour": "red", "size": "large", "position": "centre"}
        wr._draw([(ImageDraw.Draw(mask), 255)], obj, 64, random.Random(0))
        masks.append(np.asarray(mask) > 0)
    for i in range(len(masks)):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (OBJECT_CLASSES[i], OBJECT_CLASSES[j], iou)
    py = random.Random(5)
    for _ in range(100):
        layers = []
        for obj in wr.sample_objects(py, 3):
            obj["size"] = "large"  # the worst case
            mask = Image.new("L", (64, 64))
            wr._draw([(ImageDraw.Draw(mask), 1)], obj, 64, py)
            layers.append(np.asarray(mask, dtype=int))
        assert np.sum(layers, axis=0).max() == 1


def test_manifest(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["object_classes"] == OBJECT_CLASSES and manifest["scenes"] == SCENES
    assert manifest["counts"]["pairs/train"] == 40 and manifest["counts"]["retrieval/test"] == 6
    assert manifest["files"]["pairs/train"] == [f"pairs/train-00000{i}.tar" for i in range(3)]
    for files in manifest["files"].values():
        for name in [files] if isinstance(files, str) else files:
            if "{" not in name:
                assert (world / name).is_file(), name
    assert not list(world.rglob("*.tmp"))


@pytest.mark.parametrize("split,total", [("train", 40), ("val", 8)])
def test_shards_read_back_with_webdataset(world, split, total):
    shards = sorted(str(p) for p in (world / "pairs").glob(f"{split}-*.tar"))
    assert len(shards) == -(-total // TINY.shard_size)
    dataset = wds.WebDataset(shards, shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"{split}-{i:06d}" for i in range(total)]
    for index, sample in enumerate(samples):
        image, meta = render(TINY, split, index)  # order-independent: any index, any time
        assert np.array_equal(_pixels(sample["png"]), _pixels(image))
        assert sample["txt"] == meta["captions"][0]
        record = sample["json"]
        assert record["captions"] == meta["captions"]
        assert {k: record[k] for k in ("place", "scene", "objects")} == {
            k: meta[k] for k in ("place", "scene", "objects")
        }


def test_retrieval_is_karpathy_format(world):
    data = json.loads((world / "retrieval" / "dataset_world.json").read_text())
    assert data["dataset"] == "world"
    images = data["images"]
    assert [im["split"] for im in images] == ["test"] * 6 + ["val"] * 4
    assert [im["imgid"] for im in images] == list(range(10))
    sentids = [s for im in images for s in im["sentids"]]
    assert len(set(sentids)) == len(sentids) == 50
    for im in images:
        path = world / "retrieval" / im["filepath"] / im["filename"]
        assert path.is_file() and re.fullmatch(r"r\d{6}\.png", im["filename"])
        assert len(im["sentences"]) == 5 and [s["sentid"] for s in im["sentences"]] == im["sentids"]
        for sentence in im["sentences"]:
            assert sentence["imgid"] == im["imgid"]
            assert sentence["tokens"] == re.findall(r"[a-z0-9]+", sentence["raw"].lower())
    val = images[6 + 2]  # val image 2 is stream index 2 of retrieval_val
    image, meta = render(TINY, "retrieval_val", 2)
    with Image.open(world / "retrieval" / "images" / val["filename"]) as written:
        assert np.array_equal(_pixels(written), _pixels(image))
    assert [s["raw"] for s in val["sentences"]] == meta["captions"]


@pytest.mark.parametrize("where", sorted(FOLDER_SETS))
def test_class_folders(world, where):
    split, names, per_class = FOLDER_SETS[where]
    dataset = where.split("/")[0]
    root = world / where
    folders = sorted(p.name for p in root.iterdir())
    classnames = (world / dataset / "classnames.txt").read_text().splitlines()
    assert classnames == list(names)
    assert [re.sub(r"^\d{3}_", "", f).replace("_", " ") for f in folders] == classnames
    for label, folder in enumerate(folders):
        files = sorted((root / folder).glob("*.png"))
        assert len(files) == per_class
        index = int(files[-1].stem)
        image, meta = render(TINY, split, index)
        assert meta["label"] == label
        with Image.open(files[-1]) as written:
            assert np.array_equal(_pixels(written), _pixels(image))
    if dataset.startswith("zeroshot"):
        templates = (world / dataset / "templates.txt").read_text().splitlines()
        assert len(templates) >= 5 and all("{}" in t for t in templates)


def test_write_world_is_idempotent_and_refuses_another_spec(world):
    manifest = world / "manifest.json"
    shard = world / "pairs" / "train-000000.tar"
    stamps = manifest.stat().st_mtime_ns, shard.stat().st_mtime_ns
    assert write_world(world, TINY) == manifest
    assert write_world(world, WorldSpec(**{**TINY.content(), "workers": 3})) == manifest
    assert (manifest.stat().st_mtime_ns, shard.stat().st_mtime_ns) == stamps
    with pytest.raises(WorldSpecMismatch, match="another directory"):
        write_world(world, WorldSpec(**{**TINY.content(), "seed": 1}))


def test_interrupted_run_is_redone_and_workers_do_not_change_content(tmp_path):
    spec = WorldSpec(
        train_pairs=12,
        val_pairs=3,
        retrieval_test=2,
        retrieval_val=2,
        zeroshot_per_class=1,
        zeroshot_val_per_class=1,
        pretrain_objects_per_class=1,
        pretrain_scenes_per_class=1,
        pretrain_val_fraction=1.0,
        shard_size=5,
    )
    partial = tmp_path / "partial"
    (partial / "pairs").mkdir(parents=True)
    (partial / STARTED).write_text("{}")  # what an interrupted run of ours writes first
    (partial / "pairs" / "train-000009.tar").write_bytes(b"junk from an interrupted run")
    write_world(partial, spec)
    assert not (partial / "pairs" / "train-000009.tar").exists()
    assert not (partial / STARTED).exists()
    parallel = write_world(tmp_path / "parallel", WorldSpec(**{**spec.content(), "workers": 2}))
    for shard in sorted((partial / "pairs").glob("*.tar")):
        assert shard.read_bytes() == (parallel.parent / "pairs" / shard.name).read_bytes()
    for name in ("dataset_world.json",):
        assert (partial / "retrieval" / name).read_text() == (
            parallel.parent / "retrieval" / name
        ).read_text()


def test_a_folder_of_the_users_own_files_is_refused_never_cleared(tmp_path):
    mine = tmp_path / "mydata"
    (mine / "pairs").mkdir(parents=True)
    (mine / "retrieval").mkdir()
    (mine / "pairs" / "000000.tar").write_bytes(b"the user's shard")
    (mine / "retrieval" / "dataset_coco.json").write_text("{}")
    with pytest.raises(ForeignFolderError) as error:
        write_world(mine, TINY)
    assert str(error.value) == (
        f"data.world.dir={mine} is not empty (pairs, retrieval) and was not written by "
        "threetowers (no manifest.json), so writing the world there could delete those files; "
        "give data.world.dir a new or empty folder"
    )
    assert (mine / "pairs" / "000000.tar").read_bytes() == b"the user's shard"
    assert sorted(p.name for p in mine.iterdir()) == ["pairs", "retrieval"]


def test_workers_generate_under_a_callers_sigterm_handler(tmp_path):
    """`train` handles SIGTERM by setting a flag; the world's pool workers, spawned rather than
    forked, do not inherit that handler, so the pool's terminate() at the end ends them (a
    forked worker ignored it and the run hung, now and then)."""
    script = tmp_path / "generate.py"
    script.write_text(
        "import dataclasses, signal, sys, threading\n"
        "from threetowers.project.world.generate import write_world\n"
        "from tests.helpers.world import TINY\n"
        "if __name__ == '__main__':\n"
        "    stop = threading.Event()\n"
        "    signal.signal(signal.SIGTERM, lambda *_: stop.set())\n"
        "    write_world(sys.argv[1], dataclasses.replace(TINY, workers=2))\n"
        "    print('written')\n"
    )
    root = Path(__file__).parents[3]
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "world")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0 and done.stdout == "written\n", done.stderr
