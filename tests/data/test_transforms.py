"""Transforms checked against direct PIL / numpy computations."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from threetowers.backbones.frozen import Preprocessing
from threetowers.data.sources.decode import to_rgb
from threetowers.data.transforms import eval_transform, train_transform
from threetowers.errors import UserError


def gradient(width: int, height: int) -> Image.Image:
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    array = np.stack([x * 5 % 256, y * 7 % 256, np.full_like(x, 100)], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def normalised(array: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    tensor = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (tensor - mean) / std


def test_eval_centre_crop_without_resize_is_exact():
    pre = Preprocessing(24, crop_fraction=0.8)  # shorter side 30: the image already has it
    image = gradient(40, 30)
    out = eval_transform(pre)(image)
    expected = normalised(np.asarray(image)[3:27, 8:32], pre)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resize", ["bicubic", "bilinear", "nearest"])
def test_eval_resizes_shorter_side_then_crops(resize):
    pre = Preprocessing(24, resize=resize, crop_fraction=0.8)
    image = gradient(45, 90)  # portrait: width is the shorter side -> 30 x 60
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    resized = np.asarray(image.resize((30, 60), resample=filters[resize]))
    expected = normalised(resized[18:42, 3:27], pre)
    torch.testing.assert_close(eval_transform(pre)(image), expected, rtol=0, atol=1e-6)


def test_the_longer_side_truncates_as_torchvision_resize_does():
    # 30 x 47 to a shorter side of 24: 47 * 24 / 30 = 37.6 -> 37 (rounding would give 38).
    pre = Preprocessing(24, crop_fraction=1.0)
    image = gradient(30, 47)
    resized = np.asarray(image.resize((24, 37), resample=Image.BICUBIC))
    expected = normalised(resized[6:30, :], pre)
    torch.testing.assert_close(eval_transform(pre)(image), expected, rtol=0, atol=1e-6)


def test_normalisation_values():
    pre = Preprocessing(8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    out = eval_transform(pre)(Image.new("RGB", (13, 11), (255, 0, 51)))
    for channel, value in enumerate([(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, 0.2 / 2.0]):
        torch.testing.assert_close(out[channel], torch.full((8, 8), value), rtol=0, atol=1e-6)


def test_exif_rotated_image_comes_out_upright():
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise: left becomes top
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif.tobytes())
    upright = to_rgb(Image.open(io.BytesIO(buffer.getvalue())))
    assert upright.size == (10, 20)
    assert upright.getpixel((5, 2)) == (255, 0, 0)
    assert upright.getpixel((5, 17)) == (0, 0, 255)


def test_mode_conversions():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    converted = to_rgb(rgba)
    assert converted.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert converted.getpixel((1, 1)) == (255, 0, 0)

    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((2, 2), 1)
    assert to_rgb(palette).getpixel((2, 2)) == (10, 200, 30)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)

    assert to_rgb(Image.new("L", (3, 3), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("LA", (3, 3), (0, 0))).getpixel((0, 0)) == (255, 255, 255)

    sixteen = Image.fromarray(np.array([[65535, 257 * 100], [0, 257]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    out = to_rgb(sixteen)
    assert [out.getpixel(p)[0] for p in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [255, 100, 0, 1]

    assert to_rgb(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (3, 3), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert all(to_rgb(Image.new(m, (2, 2))).mode == "RGB" for m in ["1", "I", "F", "YCbCr"])


def test_train_transform_is_deterministic_per_rng():
    pre = Preprocessing(16)
    transform = train_transform(pre)
    image = gradient(50, 40)
    a = transform(image, np.random.default_rng(7))
    b = transform(image, np.random.default_rng(7))
    c = transform(image, np.random.default_rng(8))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    clone = pickle.loads(pickle.dumps(transform))
    assert torch.equal(clone(image, np.random.default_rng(7)), a)


def test_random_crops_stay_within_bounds_scale_and_ratio():
    transform = train_transform(Preprocessing(16), scale=(0.3, 0.9), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    width, height = 120, 80
    for _ in range(300):
        left, top, right, bottom = transform.crop_box(width, height, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert 0.3 - 0.03 <= w * h / (width * height) <= 0.9 + 0.03
        assert 0.5 * 0.9 <= w / h <= 2.0 * 1.1


def test_full_crop_equals_direct_resize_and_is_not_flipped():
    pre = Preprocessing(16, resize="bilinear")
    image = gradient(48, 32)
    transform = train_transform(pre, scale=(1.0, 1.0), ratio=(1.5, 1.5))
    expected = normalised(np.asarray(image.resize((16, 16), Image.BILINEAR)), pre)
    torch.testing.assert_close(transform(image, np.random.default_rng(3)), expected)
    # Red grows left to right in the source; every random crop must keep that direction.
    rng = np.random.default_rng(1)
    for _ in range(20):
        red = train_transform(pre)(image, rng)[0]
        assert bool((red[:, 1:] >= red[:, :-1] - 1e-5).all())


def test_fallback_is_a_centre_crop_with_clamped_ratio():
    transform = train_transform(Preprocessing(8), scale=(0.9, 1.0))
    # A 100 x 10 strip: no crop with aspect <= 4/3 can cover 90% of it.
    assert transform.crop_box(100, 10, np.random.default_rng(0)) == (43, 0, 56, 10)


def test_a_crop_scale_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="scale must satisfy 0 < lo <= hi <= 1"):
        train_transform(Preprocessing(8), scale=(0.9, 0.1))  # pretrain.crop_scale
