"""Image transforms from PIL images to normalised tensors, for evaluation and training.

Hand-written on PIL + torch because torchvision is not usable in this environment; the
maths follows the usual resize / centre-crop / random-resized-crop definitions.
"""

from __future__ import annotations

import math
from math import ceil

import numpy as np
import torch
from PIL import Image

from threetowers.backbones.frozen import Preprocessing
from threetowers.data.sources.decode import EncodedImage, to_rgb
from threetowers.errors import UserError

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class _Normalised:
    """Shared state of both transforms: output size, resampling filter and statistics."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        self.size = pre.image_size
        self.resample = _RESAMPLE[pre.resize]

    def _finish(self, image: Image.Image) -> torch.Tensor:
        return self.pre.normalize_pixels(_pixels(image)).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pre})"


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class EvalTransform(_Normalised):
    """Resize the shorter side to ``round(S / crop_fraction)``, centre-crop S, normalise."""

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__(pre)
        self.resize_to = round(pre.image_size / pre.crop_fraction)

    def __call__(self, image: Image.Image | EncodedImage) -> torch.Tensor:
        image = _upright(image)
        width, height = image.size
        short = min(width, height)
        # The longer side truncates, as torchvision's Resize does: an exported model gets the
        # pixels here that OpenCLIP's preprocessing gives it there.
        new_w = self.resize_to if width == short else int(width * self.resize_to / short)
        new_h = self.resize_to if height == short else int(height * self.resize_to / short)
        image, _ = _decoded(image, (new_w, new_h))
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=self.resample)
        left = int(round((new_w - self.size) / 2.0))
        top = int(round((new_h - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        return self._finish(image)


class TrainTransform(_Normalised):
    """Random resized crop (no horizontal flip: captions say "left" and "right").

    A crop with area fraction in ``scale`` and aspect ratio (w/h) in ``ratio`` is drawn up to
    ten times; if none fits, the largest centred crop with a clamped aspect ratio is used.
    The crop is then resized to S x S and normalised. All randomness comes from ``rng``.
    """

    def __init__(
        self,
        pre: Preprocessing,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__(pre)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(f"train_transform scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"train_transform ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, ...]:
        """(left, top, right, bottom) of the crop for a width x height image."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image | EncodedImage, rng: np.random.Generator) -> torch.Tensor:
        image = _upright(image)
        box = self.crop_box(*image.size, rng)
        left, top, right, bottom = box
        scale = max(self.size / (right - left), self.size / (bottom - top))
        image, drafted = _decoded(image, (ceil(image.size[0] * scale), ceil(image.size[1] * scale)))
        # resize(box=...) crops and resamples in one pass, without an intermediate copy.
        box = tuple(side * drafted for side in box) if drafted != 1 else box
        image = image.resize((self.size, self.size), resample=self.resample, box=box)
        return self._finish(image)


def _upright(image: Image.Image | EncodedImage) -> Image.Image | EncodedImage:
    """A decoded image as upright RGB; an encoded one knows its upright size already."""
    return image if isinstance(image, EncodedImage) else to_rgb(image)


def _decoded(
    image: Image.Image | EncodedImage, needed: tuple[int, int]
) -> tuple[Image.Image, float]:
    """Upright RGB at least ``needed`` in size, and its scale to the full image (< 1 where an
    encoded JPEG was decoded at a fraction of its size: ``EncodedImage``)."""
    return image.decoded(needed) if isinstance(image, EncodedImage) else (image, 1.0)


def eval_transform(pre: Preprocessing) -> EvalTransform:
    """Picklable callable: PIL image -> (3, S, S) float32 tensor, normalised for ``pre``."""
    return EvalTransform(pre)


def train_transform(
    pre: Preprocessing,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> TrainTransform:
    """Picklable callable: (PIL image, numpy Generator) -> (3, S, S) float32 tensor."""
    return TrainTransform(pre, scale, ratio)


class _Pixels:
    """Transform mixin: end at uint8 (3, S, S) pixels instead of normalised float32.

    On a few CPU cores the loader's per-image work bounds the training loop, and scaling and
    normalising one small image at a time costs more in per-call overhead than in arithmetic.
    ``Preprocessing.normalize_pixels`` then does it once per batch, with the same operations
    in the same order, so the floats equal the transforms' own bit for bit.
    """

    def _finish(self, image: Image.Image) -> torch.Tensor:
        return _pixels(image)


class PixelEvalTransform(_Pixels, EvalTransform):
    """``EvalTransform`` (resize, centre crop) returning uint8 pixels."""


class PixelTrainTransform(_Pixels, TrainTransform):
    """``TrainTransform`` (random resized crop) returning uint8 pixels."""
