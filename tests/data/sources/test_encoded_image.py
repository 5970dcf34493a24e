"""data/sources/decode.py's EncodedImage: an image decoded by the transform that reads it, at
the smallest scale that covers what it needs. Pixels and geometry equal the full decode's
wherever no smaller scale is taken (every non-JPEG, every small or turned JPEG); a JPEG
decoded at a smaller scale gives the same crop, its pixels near the full decode's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.bad_data import BAD, ODD_BUT_VALID, encoded, exif_rotated
from threetowers.backbones.frozen import Preprocessing
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.decode import EncodedImage, load_image
from threetowers.data.transforms import PixelEvalTransform, PixelTrainTransform

PRE = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, resize="bicubic", crop_fraction=0.875)


def photo(width: int, height: int) -> Image.Image:
    """A smooth photograph-like image: a JPEG of noise would be all high frequencies."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)


def views(image) -> tuple[torch.Tensor, torch.Tensor]:
    crop = PixelTrainTransform(PRE, scale=(0.5, 1.0))
    return crop(image, np.random.default_rng(7)), PixelEvalTransform(PRE)(image)


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_images_give_the_full_decodes_views(name):
    data = ODD_BUT_VALID[name]
    encoded_image = EncodedImage(data, name)
    assert encoded_image.size == load_image(data, name).size  # upright: EXIF turns applied
    for got, expected in zip(views(encoded_image), views(load_image(data, name)), strict=True):
        assert torch.equal(got, expected)


def test_a_large_png_is_decoded_whole_and_gives_the_same_views():
    data = encoded(photo(400, 300))
    assert EncodedImage(data, "png").decoded((40, 30))[1] == 1.0
    pairs = zip(views(EncodedImage(data, "png")), views(load_image(data, "png")), strict=True)
    for got, expected in pairs:
        assert torch.equal(got, expected)


def test_a_large_jpeg_is_decoded_smaller_with_the_same_crop_and_near_pixels():
    data = encoded(photo(400, 300), "JPEG", quality=90)
    decoded, scale = EncodedImage(data, "j").decoded((50, 37))
    assert scale == 1 / 8 and decoded.size == (50, 38) and decoded.mode == "RGB"
    pre = Preprocessing(128, (0.5,) * 3, (0.5,) * 3, resize="bicubic", crop_fraction=0.875)
    image = EncodedImage(data, "j")  # the view resizes 300 px to 146: half the size covers it
    got, expected = PixelEvalTransform(pre)(image), PixelEvalTransform(pre)(load_image(data, "j"))
    assert image.decoded((1, 1))[1] == 0.5 and got.shape == expected.shape == (3, 128, 128)
    difference = (got.float() - expected.float()).abs()
    assert 0 < difference.mean() < 3  # of 255: the DCT's 2x2 average, then bicubic to 146


def test_a_scale_is_only_taken_where_it_covers_the_crop():
    data = encoded(photo(400, 300), "JPEG", quality=90)
    assert EncodedImage(data, "j").decoded((201, 150))[1] == 1.0  # 1/2 would give 200 < 201
    assert EncodedImage(data, "j").decoded((200, 150))[1] == 0.5


def test_a_turned_jpeg_is_decoded_whole():
    data = exif_rotated()
    image = EncodedImage(data, "turned")
    assert image.decoded((1, 1))[1] == 1.0
    assert image.decoded((1, 1))[0].tobytes() == load_image(data, "turned").tobytes()


def test_one_decode_serves_every_view_that_needs_no_more():
    data = encoded(photo(400, 300), "JPEG", quality=90)
    image = EncodedImage(data, "j")
    first = image.decoded((100, 75))
    assert image.decoded((50, 38)) is first  # covered: not decoded again
    assert image.decoded((400, 300))[1] == 1.0  # more is needed: decoded again, whole


@pytest.mark.parametrize("name", ["truncated_jpeg", "zero_bytes", "garbage", "bomb"])
def test_bad_image_bytes_are_bad_samples_when_opened_or_decoded(name):
    data, _, reason = BAD[name]
    with pytest.raises(BadSample) as caught:
        EncodedImage(data, name).decoded((8, 8))
    assert caught.value.reason == reason


def test_a_truncated_jpeg_is_skipped_by_the_loader_and_named(tmp_path):
    import webdataset as wds

    from threetowers.data.sources.loader import pair_batches

    good = encoded(photo(64, 48), "JPEG")
    cut = good[: len(good) // 2]
    with wds.TarWriter(str(tmp_path / "s-0.tar")) as sink:
        for index, image in enumerate([good, cut, good, good]):
            sink.write({"__key__": f"k{index}", "jpg": image, "txt": b"a photo"})

    def example(pair, rng):
        return {"pixels": PixelTrainTransform(PRE)(pair.image, rng)}

    batches = list(
        pair_batches(
            str(tmp_path / "s-0.tar"),
            example=example,
            batch_size=4,
            seed=0,
            epoch=0,
            shuffle_buffer=1,
            encoded_images=True,
        )
    )
    assert len(batches) == 1 and len(batches[0]["ids"]) == 3
    [skipped] = batches[0]["skipped"]
    assert skipped.id.endswith("/k1") and skipped.reason == "undecodable_image"
