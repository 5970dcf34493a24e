"""The held-out vocabulary: no training caption uses it, and the world's held-out sets are the
ordinary images in those words."""

import json
import os
import re

from threetowers.data.benchmarks import load_class_folder, load_karpathy
from threetowers.project.world.generate import write_world
from threetowers.project.world.heldout import (
    HELDOUT_CLASS_WORDS,
    HELDOUT_CLASSNAMES,
    HELDOUT_FRAMES,
    HELDOUT_PLACE_WORDS,
    HELDOUT_TEMPLATES,
)
from threetowers.project.world.render import COLOURS, OBJECT_CLASSES, PLACES, SCENES
from threetowers.project.world.shapes import LANDMARKS
from threetowers.project.world.spec import WorldSpec, render

# Articles join held-out nouns to any sentence; every other word of the held-out sets is new.
ARTICLES = {"a", "an", "the"}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


HELDOUT_WORDS = (
    set().union(
        *map(words, [*HELDOUT_CLASS_WORDS.values(), *HELDOUT_PLACE_WORDS.values(), *HELDOUT_FRAMES])
    )
    - ARTICLES
)


def test_every_class_and_place_has_one_heldout_word():
    assert list(HELDOUT_CLASS_WORDS) == OBJECT_CLASSES and list(HELDOUT_PLACE_WORDS) == PLACES
    assert HELDOUT_CLASSNAMES == [HELDOUT_CLASS_WORDS[name] for name in OBJECT_CLASSES]
    assert len(set(HELDOUT_CLASSNAMES)) == len(OBJECT_CLASSES)  # no two classes share one
    assert all(template.count("{}") == 1 for template in HELDOUT_TEMPLATES)


def test_no_training_caption_of_the_default_world_uses_a_heldout_word():
    """Every caption of the default world's training and validation pairs, as its shards
    hold them (render is what writes them): none contains a held-out word, nor a training
    word that a subword tokenizer could build a held-out word from."""
    spec = WorldSpec()
    vocabulary: set[str] = set()
    for split, total in (("train", spec.train_pairs), ("val", spec.val_pairs)):
        for index in range(total):
            _, meta = render(spec, split, index)
            for caption in meta["captions"]:
                vocabulary |= words(caption)
    assert len(vocabulary) > 100  # the captions' whole vocabulary was seen
    assert not vocabulary & HELDOUT_WORDS
    inside = [(old, new) for new in HELDOUT_WORDS for old in vocabulary if len(old) >= 3]
    assert not [(old, new) for old, new in inside if old in new]


def test_the_world_writes_its_heldout_sets_on_the_ordinary_images(tmp_path):
    spec = WorldSpec(
        train_pairs=40, val_pairs=10, retrieval_test=12, retrieval_val=6, zeroshot_per_class=2,
        zeroshot_val_per_class=1, pretrain_objects_per_class=1, pretrain_scenes_per_class=1,
        shard_size=40,
    )  # fmt: skip
    root = write_world(tmp_path, spec).parent
    manifest = json.loads((root / "manifest.json").read_text())
    assert "retrieval/dataset_world_heldout.json" in manifest["files"]["retrieval"]
    for split in ("test", "val"):
        ordinary = load_karpathy(root / "retrieval" / "dataset_world.json", split=split)
        heldout = load_karpathy(root / "retrieval" / "dataset_world_heldout.json", split=split)
        assert heldout.image_paths == ordinary.image_paths
        assert heldout.image_of_caption.tolist() == ordinary.image_of_caption.tolist()
        assert all(words(caption) & HELDOUT_WORDS for caption in heldout.captions)
        assert not any(words(caption) & HELDOUT_WORDS for caption in ordinary.captions)
        objects = load_class_folder(root / "zeroshot_objects", split)
        prompted = load_class_folder(root / "zeroshot_objects_heldout", split)
        assert [os.path.realpath(p) for p in prompted.image_paths] == [
            os.path.realpath(p) for p in objects.image_paths
        ]
        assert prompted.labels.tolist() == objects.labels.tolist()
        assert prompted.class_names == HELDOUT_CLASSNAMES
        assert prompted.templates == HELDOUT_TEMPLATES
    # The held-out captions describe the same image: its objects' held-out nouns, in order of
    # the image's own metadata, and the ordinary captions are untouched by their stream.
    entries = json.loads((root / "retrieval" / "dataset_world_heldout.json").read_text())
    first = entries["images"][0]
    _, meta = render(spec, "retrieval_test", 0)
    nouns = {HELDOUT_CLASS_WORDS[o["class"]] for o in meta["objects"]}
    for sentence in first["sentences"]:
        assert words(sentence["raw"]) >= set().union(*map(words, nouns))


def test_heldout_words_are_none_of_the_worlds_names():
    """Nor a colour, a scene or a landmark shape (which no caption names, but a user might)."""
    names = [*OBJECT_CLASSES, *PLACES, *SCENES, *COLOURS, *LANDMARKS]
    assert not set().union(*map(words, names)) & HELDOUT_WORDS
