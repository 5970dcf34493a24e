"""The embedded image-caption world: a procedural, seeded stand-in for web image-text data.

It exists so that CLIP, LiT and Three Towers can be trained and compared on two CPU cores with
the paper's structure intact: captions describe more than any class label does (colour, size,
position, count, place), an object-labelled pretraining set plays ImageNet/JFT (its labels
match the zero-shot object classes) and a scene-labelled set plays Places365: fine labels, rich
but mismatched. In that set a scene shows its place in any of the place's variants, plus one or
two *landmarks* (shapes that are never objects), and only its landmark tells it from the other
scenes of its place, as what a room contains tells a Places365 class. Its classifier must learn
shape features without ever seeing an object class; when scene labels could be read off the
palette (version 2) its features held no shape at all and 3T fell to CLIP's level or below.
Every sample is a pure function of
``(seed, split, index)``, so generation is order-independent and parallel.

This module says what the world is: its spec, its splits and every sample of them
(:func:`render`); ``generate.py`` writes it to disk, ``render.py`` draws an image and
``captions.py`` describes it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from threetowers.project.world.captions import captions
from threetowers.project.world.render import (
    OBJECT_CLASSES,
    PLACES,
    SCENES,
    VARIANTS,
    compose,
    landmark_of,
    sample_objects,
)

# Bump whenever rendering or captions change, so an old world on disk is never reused.
# 4: the held-out vocabulary sets (heldout.py); the other outputs are as in 3.
VERSION = 4

OBJECT_TEMPLATES = [
    "a photo of a {}.",
    "a {} on some background.",
    "a picture of a {}.",
    "there is a {} in the image.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
    "a coloured {}.",
]
PLACE_TEMPLATES = [
    "a photo of {}.",
    "a picture of {}.",
    "shapes on {}.",
    "an image with a {} background.",
    "something in front of {}.",
    "{} in the background.",
]

# split name -> (stream id, content). The id seeds the split's random stream, so no two
# splits share an image. Contents: "pairs" = 1-3 random objects on a random scene; "object" =
# one object of class index % 12; "place" = place index % 9; "scene" = scene index % 27, shown
# by its landmarks on its place (no objects, so no captions).
SPLITS = {
    "train": (0, "pairs"),
    "val": (1, "pairs"),
    "retrieval_test": (2, "pairs"),
    "retrieval_val": (3, "pairs"),
    "zeroshot_objects_test": (4, "object"),
    "zeroshot_objects_val": (5, "object"),
    "zeroshot_places_test": (6, "place"),
    "zeroshot_places_val": (7, "place"),
    "pretrain_objects_train": (8, "object"),
    "pretrain_objects_val": (9, "object"),
    "pretrain_scenes_train": (10, "scene"),
    "pretrain_scenes_val": (11, "scene"),
}
# The class names of each labelled kind of split.
LABELS = {"object": OBJECT_CLASSES, "place": PLACES, "scene": SCENES}


@dataclass(frozen=True)
class WorldSpec:
    """What to generate. ``workers`` only sets parallelism: it never changes the content."""

    seed: int = 0
    image_size: int = 64
    train_pairs: int = 20000
    val_pairs: int = 1000
    retrieval_test: int = 1000
    retrieval_val: int = 500
    captions_per_image: int = 5
    zeroshot_per_class: int = 100  # test
    zeroshot_val_per_class: int = 50
    pretrain_objects_per_class: int = 1500
    pretrain_scenes_per_class: int = 600
    pretrain_val_fraction: float = 0.1
    shard_size: int = 2000
    workers: int = 1

    def content(self) -> dict:
        """The fields that determine the world's content (all but ``workers``)."""
        fields = dataclasses.asdict(self)
        fields.pop("workers")
        return fields


def render(spec: WorldSpec, split: str, index: int) -> tuple[Image.Image, dict]:
    """Sample ``index`` of ``split`` (a key of ``SPLITS``): the image and its metadata
    ``{place, scene, objects: [{class, colour, size, position}], count, captions}``, plus
    ``label`` (an index into the split's class list) for the labelled splits."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    split_id, kind = SPLITS[split]
    rng = np.random.default_rng([spec.seed, split_id, index])
    py = random.Random(int(rng.integers(1 << 62)))  # Python's RNG: fast for scalar choices
    label, landmarks = None, []
    if kind == "object":  # one object of a fixed class, random everything else
        label = index % len(OBJECT_CLASSES)
        scene = py.randrange(len(SCENES))
        objects = sample_objects(py, 1, OBJECT_CLASSES[label])
    elif kind == "scene":  # the scene's landmarks tell it apart, not its place's variant
        label = index % len(SCENES)
        scene = label // VARIANTS * VARIANTS + py.randrange(VARIANTS)
        landmarks = sample_objects(py, py.choice((1, 2)), landmark_of(label))
        landmarks = [thing | {"class": landmark_of(label)} for thing in landmarks]  # all alike
        objects = []
    else:
        if kind == "place":
            label = index % len(PLACES)
            scene = label * VARIANTS + py.randrange(VARIANTS)
        else:
            scene = py.randrange(len(SCENES))
        objects = sample_objects(py, py.choice((1, 1, 2, 2, 3)))
    image = compose(rng, py, spec.image_size, scene, objects + landmarks)
    meta = {
        "place": PLACES[scene // VARIANTS],
        "scene": SCENES[scene],
        "objects": objects,
        "count": len(objects),
    }
    meta["captions"] = captions(meta, py, spec.captions_per_image) if objects else []
    if label is not None:
        meta["label"] = label
    return image, meta
