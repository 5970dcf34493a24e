"""The training pipeline's per-batch normalisation equals the transforms' own, bit for bit."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from threetowers.data.pipeline import Normalise, PixelEvalTransform, PixelTrainTransform
from threetowers.data.transforms import eval_transform, train_transform
from threetowers.towers.frozen import Preprocessing


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (50, 80), (97, 41), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_pixel_transforms_then_normalise_equal_the_float_transforms():
    for pre in (
        Preprocessing(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="bicubic", crop_fraction=1.0),
        Preprocessing(40, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875),
    ):
        images = _images()
        pixels = torch.stack([PixelEvalTransform(pre)(image) for image in images])
        size = pre.image_size
        assert pixels.dtype == torch.uint8 and pixels.shape == (len(images), 3, size, size)
        expected = torch.stack([eval_transform(pre)(image) for image in images])
        assert torch.equal(Normalise(pre)(pixels), expected)

        crops = PixelTrainTransform(pre, scale=(0.5, 1.0))
        pixels = torch.stack([crops(im, np.random.default_rng(i)) for i, im in enumerate(images)])
        reference = train_transform(pre, scale=(0.5, 1.0))
        expected = torch.stack(
            [reference(im, np.random.default_rng(i)) for i, im in enumerate(images)]
        )
        assert torch.equal(Normalise(pre)(pixels), expected)
