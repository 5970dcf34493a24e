"""The embedded world's images with what they show: each sample is a function of the world's
seed, its split and its index (``project/world/spec.py``), so rendering it again gives the
stored image and its metadata, which the files do not all carry (the retrieval sets keep
only captions)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from threetowers.config import WorldConfig
from threetowers.project.world.default import ensure_world
from threetowers.project.world.spec import WorldSpec, render

# Attributes of the one object of a single-object image; count and place hold for every image.
OBJECT_ATTRIBUTES = ("class", "colour", "size", "position")
ATTRIBUTES = ("object class", "colour", "size", "position", "count", "place")


@dataclass
class Samples:
    images: list[Image.Image]
    captions: list[str]  # each image's first caption (the longest kind: every attribute)
    attributes: dict[str, list[str | None]]  # name -> per image; None: not defined there

    def __len__(self) -> int:
        return len(self.images)


def world_samples(world: WorldConfig, splits: tuple[str, ...]) -> Samples:
    """Every sample of the pair ``splits`` (e.g. ``retrieval_test``) of ``world``, rendered
    again with its attributes; object attributes only where the image shows one object."""
    manifest = ensure_world(world)
    spec = WorldSpec(**manifest["spec"])
    sizes = {
        "val": spec.val_pairs,
        "retrieval_test": spec.retrieval_test,
        "retrieval_val": spec.retrieval_val,
    }
    images, captions = [], []
    attributes: dict[str, list[str | None]] = {name: [] for name in ATTRIBUTES}
    for split in splits:
        for index in range(sizes[split]):
            image, meta = render(spec, split, index)
            images.append(image.convert("RGB"))
            captions.append(meta["captions"][0])
            single = meta["objects"][0] if meta["count"] == 1 else None
            for name, key in zip(ATTRIBUTES, OBJECT_ATTRIBUTES, strict=False):
                attributes[name].append(single[key] if single else None)
            attributes["count"].append(str(meta["count"]))
            attributes["place"].append(meta["place"])
    return Samples(images, captions, attributes)
