"""Each tower's view of an image, chosen for one model: what an example makes of an image
(uint8 pixels) and how its batch is normalised.

The data layer never imports the model: :class:`Towers` is what it needs to know of one,
as plain values (the trainer makes it from the model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.data.transforms import PixelEvalTransform, PixelTrainTransform

Normalise = Callable[[torch.Tensor], torch.Tensor]  # a uint8 batch -> float32


@dataclass(frozen=True)
class Towers:
    """The model as its data sees it."""

    image: Preprocessing | None  # the image view's: f's, or lit's locked image tower's
    trains_image: bool  # f is trained, so its view may be augmented
    frozen_images: Mapping[str, FrozenBackbone]  # the frozen towers that read images
    frozen_text: Mapping[str, FrozenTextEncoder]  # those that read captions
    aligned: tuple[str, ...]  # the frozen towers f and g are aligned with
    digests: Mapping[str, str]  # every frozen tower's weights and preprocessing, by name


@dataclass(frozen=True)
class Views:
    """The views an example makes of an image, and the normalisation of each in a batch."""

    image: Callable | None = None  # the image view (fixed); None: no tower reads it
    augment: PixelTrainTransform | None = None  # f's random resized crop, in its place
    normalise: Normalise | None = None  # the image view's (or the crop's)
    frozen: dict[str, PixelEvalTransform] = field(default_factory=dict)  # live frozen towers'
    frozen_normalise: dict[str, Normalise] = field(default_factory=dict)


def training_views(
    towers: Towers, cached: set[str], augment: bool, crop_scale: tuple[float, float]
) -> Views:
    """The views training reads, ``cached`` naming the frozen image towers whose features
    come from their caches (they need no view of their own)."""
    pre = towers.image
    # lit's image view is the locked tower's input, needed only when it runs live
    needs_images = towers.trains_image or any(name not in cached for name in towers.frozen_images)
    crop = None
    if towers.trains_image and augment:
        crop = PixelTrainTransform(pre, scale=crop_scale)
    live = [name for name in towers.aligned if name in towers.frozen_images and name not in cached]
    return Views(
        image=PixelEvalTransform(pre) if needs_images else None,
        augment=crop,
        normalise=pre.normalize_pixels if needs_images else None,
        frozen={
            name: PixelEvalTransform(towers.frozen_images[name].preprocessing) for name in live
        },
        frozen_normalise={
            name: towers.frozen_images[name].preprocessing.normalize_pixels for name in live
        },
    )


def validation_views(towers: Towers) -> Views:
    """Fixed views, every aligned frozen image tower live (held-out pairs have no caches)."""
    pre = towers.image
    aligned = [name for name in towers.aligned if name in towers.frozen_images]
    frozen = {name: towers.frozen_images[name].preprocessing for name in aligned}
    return Views(
        image=PixelEvalTransform(pre) if pre is not None else None,
        normalise=pre.normalize_pixels if pre is not None else None,
        frozen={name: PixelEvalTransform(tower) for name, tower in frozen.items()},
        frozen_normalise={name: tower.normalize_pixels for name, tower in frozen.items()},
    )
