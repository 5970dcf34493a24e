"""Evaluation sets: a Karpathy-format JSON and class folders written here."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from threetowers.backbones.frozen import Preprocessing
from threetowers.config import EvalConfig
from threetowers.data.benchmarks import (
    DEFAULT_TEMPLATES,
    ImageFiles,
    collate_images,
    load_class_folder,
    load_karpathy,
)
from threetowers.data.transforms import eval_transform
from threetowers.errors import UserError
from threetowers.evaluation.benchmark_sets import resolve_benchmarks

KARPATHY = [  # (filepath, filename, split, number of sentences)
    ("val2014", "a.jpg", "test", 2),
    ("train2014", "b.jpg", "train", 1),
    ("val2014", "c.jpg", "test", 3),
    ("val2014", "d.jpg", "val", 2),
    ("val2014", "e.jpg", "restval", 1),
    ("val2014", "f.jpg", "test", 1),
]


def write_karpathy(root, skip=()):
    images = []
    for number, (filepath, filename, split, count) in enumerate(KARPATHY):
        sentences = [
            {"raw": f" {filename} caption {j}\n", "tokens": [filename, "caption"], "sentid": j}
            for j in range(count)
        ]
        images.append(
            {"filepath": filepath, "filename": filename, "split": split, "imgid": number,
             "sentences": sentences}
        )  # fmt: skip
        if filename not in skip:
            (root / filepath).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (number, 0, 0)).save(root / filepath / filename)
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_test_split(tmp_path):
    data = load_karpathy(write_karpathy(tmp_path))
    assert data.image_paths == [tmp_path / "val2014" / name for name in ("a.jpg", "c.jpg", "f.jpg")]
    assert data.captions == [
        "a.jpg caption 0", "a.jpg caption 1",
        "c.jpg caption 0", "c.jpg caption 1", "c.jpg caption 2",
        "f.jpg caption 0",
    ]  # fmt: skip
    assert data.image_of_caption.tolist() == [0, 0, 1, 1, 1, 2]
    assert data.image_of_caption.dtype == torch.long and len(data) == 3


def test_karpathy_split_choice_and_image_root(tmp_path):
    (tmp_path / "json").mkdir()
    path = write_karpathy(tmp_path)
    moved = tmp_path / "json" / path.name
    path.rename(moved)
    train = load_karpathy(moved, image_root=tmp_path, split=("train", "restval"))
    assert [p.name for p in train.image_paths] == ["b.jpg", "e.jpg"]
    assert train.image_paths[0] == tmp_path / "train2014" / "b.jpg"
    assert train.image_of_caption.tolist() == [0, 1]
    # Flickr30k has no "filepath": images sit directly under image_root.
    flickr = json.loads(moved.read_text())
    for image in flickr["images"]:
        image.pop("filepath")
    (tmp_path / "val2014" / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    val = load_karpathy(tmp_path / "val2014" / "dataset_flickr30k.json", split="val")
    assert val.image_paths == [tmp_path / "val2014" / "d.jpg"]


def flickr30k_layout(folder):
    """The Flickr30k download as people keep it: the JSON beside ``flickr30k-images/``, its
    entries without a "filepath"."""
    path = write_karpathy(folder)
    flickr = json.loads(path.read_text())
    (folder / "flickr30k-images").mkdir()
    for image in flickr["images"]:
        (folder / image.pop("filepath") / image["filename"]).rename(
            folder / "flickr30k-images" / image["filename"]
        )
    path.unlink()
    (folder / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    return folder / "dataset_flickr30k.json"


def test_the_real_flickr30k_and_coco_layouts_load_from_a_config(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="threetowers")
    flickr = flickr30k_layout(tmp_path / "flickr")
    sets = resolve_benchmarks(EvalConfig(retrieval=str(flickr)), None)
    images = tmp_path / "flickr" / "flickr30k-images"
    assert sets.retrieval["retrieval"].image_paths == [
        images / n for n in ("a.jpg", "c.jpg", "f.jpg")
    ]
    assert f"3 test images under {images}" in caplog.text  # says which folder it used
    coco = write_karpathy(tmp_path / "coco")  # beside train2014/ and val2014/
    val = resolve_benchmarks(EvalConfig(retrieval=str(coco), retrieval_split="val"), None)
    assert val.retrieval["retrieval"].image_paths == [tmp_path / "coco" / "val2014" / "d.jpg"]
    # a JSON kept apart from its images: eval.retrieval_images names their folder
    apart = tmp_path / "splits" / "dataset_flickr30k.json"
    apart.parent.mkdir()
    flickr.rename(apart)
    with pytest.raises(FileNotFoundError, match="set eval.retrieval_images to the folder"):
        resolve_benchmarks(EvalConfig(retrieval=str(apart)), None)
    cfg = EvalConfig(retrieval=str(apart), retrieval_images=str(images))
    assert resolve_benchmarks(cfg, None).retrieval["retrieval"].image_paths[0] == images / "a.jpg"


def test_karpathy_errors(tmp_path):
    path = write_karpathy(tmp_path, skip=("c.jpg", "f.jpg"))
    with pytest.raises(ValueError, match=r"no split \['tset'\].*\['restval', 'test', 'train', "):
        load_karpathy(path, split="tset")
    assert len(load_karpathy(path)) == 3  # the 2 missing are skipped when embedded
    path = write_karpathy(tmp_path / "none", skip=("a.jpg", "c.jpg", "f.jpg"))
    with pytest.raises(FileNotFoundError, match="none of the 3 images .* was found"):
        load_karpathy(path)
    assert len(load_karpathy(path, split="val")) == 1
    data = json.loads(path.read_text())
    data["images"][3]["filepath"] = "../none/val2014"  # out and back in
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="leads out of the image root.*allow_absolute_paths"):
        load_karpathy(path, split="val")
    assert len(load_karpathy(path, split="val", allow_absolute_paths=True)) == 1
    data["images"][3].pop("filename")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="image entry 3 needs a 'filename'"):
        load_karpathy(path, split="val")
    with pytest.raises(FileNotFoundError, match="Karpathy split file not found"):
        load_karpathy(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(UserError, match=r"broken.json is not a Karpathy split file: not JSON"):
        load_karpathy(broken)


def make_folders(root, folders, per_class=2):
    for label, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), (label * 40, i, 0)).save(root / folder / f"{i}.png")
        (root / folder / "notes.txt").write_text("not an image")


def test_class_folders_labels_follow_sorted_names(tmp_path):
    make_folders(tmp_path / "val", ["002_golden_retriever", "000_tench", "001_goldfish"])
    data = load_class_folder(tmp_path, split="val")
    assert data.class_names == ["tench", "goldfish", "golden retriever"]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.image_paths[0] == tmp_path / "val" / "000_tench" / "0.png"
    assert data.templates == list(DEFAULT_TEMPLATES)
    assert all("{}" in template for template in data.templates)


def test_class_names_and_templates_files(tmp_path):
    make_folders(tmp_path, ["b", "a"], per_class=1)
    (tmp_path / "classnames.txt").write_text("apple\nbanana split\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n\nart of the {}\n")
    data = load_class_folder(tmp_path)
    assert data.class_names == ["apple", "banana split"]
    assert data.templates == ["a photo of {}.", "art of the {}"]
    assert [p.parent.name for p in data.image_paths] == ["a", "b"]


def test_class_folder_errors(tmp_path):
    make_folders(tmp_path, ["x", "y"], per_class=1)
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="1 names but .* has 2 class folders"):
        load_class_folder(tmp_path)
    (tmp_path / "classnames.txt").unlink()
    (tmp_path / "templates.txt").write_text("a photo of {}\na photo\n")
    with pytest.raises(ValueError, match="template 2 .*'a photo'.* no '\\{\\}'"):
        load_class_folder(tmp_path)
    (tmp_path / "templates.txt").unlink()
    (tmp_path / "z").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_class_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_class_folder(tmp_path, split="test")


def test_image_files_in_batches(tmp_path):
    make_folders(tmp_path, ["a", "b", "c"], per_class=2)
    data = load_class_folder(tmp_path)
    pre = Preprocessing(8)
    data.image_paths[4].write_bytes(b"not a png")
    dataset = ImageFiles(data.image_paths, eval_transform(pre))
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_images))
    indices = torch.cat([index for index, _, _ in batches])
    images = torch.cat([image for _, image, _ in batches])
    assert indices.tolist() == [0, 1, 2, 3, 5] and images.shape == (5, 3, 8, 8)
    (bad,) = [skipped for _, _, batch in batches for skipped in batch]
    assert bad.id == str(data.image_paths[4]) and bad.reason == "undecodable_image"
    red = images[:, 0, 0, 0] * pre.std[0] + pre.mean[0]
    torch.testing.assert_close(red, data.labels[indices].float() * 40 / 255, rtol=0, atol=1e-5)


def test_benchmark_files_that_cannot_serve_are_user_errors(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": "none"}))
    with pytest.raises(UserError, match="is not a Karpathy split file"):
        load_karpathy(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders in"):
        load_class_folder(tmp_path / "empty")
