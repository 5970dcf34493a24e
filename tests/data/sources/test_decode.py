"""data/sources/decode.py: a sample's image as upright RGB or the reason it is bad (from a
file or bytes), its captions cleaned or the first bad one's reason, and a data file's image
paths held inside its folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.bad_data import BAD, JPEG, ODD_BUT_VALID, encoded
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.decode import (
    MAX_CAPTION_CHARS,
    caption_text,
    clean_captions,
    image_path,
    load_image,
)


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_but_valid_images_come_out_rgb_from_bytes_and_files_alike(name, tmp_path):
    data = ODD_BUT_VALID[name]
    path = tmp_path / f"{name}.img"
    path.write_bytes(data)
    image = load_image(data, name)
    assert image.mode == "RGB"
    # the EXIF-rotated JPEG is stored 12 x 9 and shows upright as 9 x 12
    assert image.size == ((9, 12) if name == "exif_rotated" else (12, 9))
    assert np.array_equal(np.asarray(load_image(path, name)), np.asarray(image))


def test_pixels_are_pillows_own_conversion():
    grey = Image.new("L", (5, 4), 77)
    assert np.array_equal(np.asarray(load_image(encoded(grey), "g")), np.full((4, 5, 3), 77))
    rgb = Image.fromarray(np.arange(60, dtype=np.uint8).reshape(4, 5, 3))
    assert np.array_equal(np.asarray(load_image(encoded(rgb), "x")), np.asarray(rgb))


def test_the_exif_rotation_is_applied_to_the_pixels():
    """EXIF orientation 6: the stored pixels are shown turned 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.zeros((9, 12, 3), np.uint8)
    pixels[:, :, 0] = np.arange(12) * 20  # red grows to the right, green downwards
    pixels[:, :, 1] = np.arange(9)[:, None] * 25
    data = encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=100)
    with Image.open(io.BytesIO(data)) as stored:
        stored = np.asarray(stored.convert("RGB"))
    turned = np.rot90(stored, k=-1)  # clockwise
    assert np.array_equal(np.asarray(load_image(data, "r")), turned)


@pytest.mark.parametrize("name", ["truncated_jpeg", "zero_bytes", "garbage", "bomb"])
def test_unusable_image_bytes_are_bad_samples_with_their_reason(name):
    data, _, reason = BAD[name]
    with pytest.raises(BadSample) as caught:
        load_image(data, "shard-0/key7")
    assert caught.value.reason == reason
    assert caught.value.detail.startswith("shard-0/key7: ")
    assert "0x" not in caught.value.detail  # no memory address: the same text every run


def test_an_image_between_one_and_two_times_the_bomb_limit_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12 * 9 - 1)  # Pillow only warns here
    with pytest.raises(BadSample) as caught:
        load_image(JPEG, "j")
    assert caught.value.reason == "oversized_image"


def test_a_missing_file_is_named_as_missing(tmp_path):
    missing = tmp_path / "gone.jpg"
    with pytest.raises(BadSample) as caught:
        load_image(missing, "row 3")
    assert caught.value.reason == "missing_file"
    assert caught.value.detail == f"row 3: No such file or directory: {missing}"


def test_caption_bytes_are_utf8_with_any_byte_order_mark_dropped():
    assert caption_text("\ufeffa caf\u00e9".encode(), "k") == "a caf\u00e9"
    with pytest.raises(BadSample) as caught:
        caption_text("caf\u00e9".encode("latin-1"), "k")
    assert caught.value.reason == "caption_not_utf8"


def test_captions_are_stripped_and_the_bad_ones_of_a_sample_dropped():
    captions = ["  a red star \n", "", 7, "x" * (MAX_CAPTION_CHARS + 1), "\ud800", "two rings"]
    assert clean_captions(captions, "k") == ["a red star", "two rings"]
    assert clean_captions(["x" * MAX_CAPTION_CHARS], "k") == ["x" * MAX_CAPTION_CHARS]


@pytest.mark.parametrize(
    "captions,reason",
    [
        ([], "no_caption"),
        ([" \t"], "empty_caption"),
        ([None, ""], "malformed_row"),  # the first bad one's reason
        (["", None], "empty_caption"),
        (["y" * (MAX_CAPTION_CHARS + 1)], "overlong_caption"),
        (["caf\udce9"], "caption_not_utf8"),  # a byte read with surrogateescape
    ],
)
def test_a_sample_without_a_usable_caption_is_bad_for_its_first_reason(captions, reason):
    with pytest.raises(BadSample) as caught:
        clean_captions(captions, "table.csv row 4")
    assert caught.value.reason == reason
    assert caught.value.detail.startswith("table.csv row 4: ")


@pytest.mark.parametrize("inside", ["a.jpg", "sub/a.jpg", "sub/../a.jpg", "./a.jpg", "..a.jpg"])
def test_paths_inside_the_tables_folder_are_relative_to_it(inside, tmp_path):
    table = tmp_path / "data" / "pairs.csv"
    assert image_path(table, inside, False, "row 1") == table.parent / inside


@pytest.mark.parametrize("outside", ["../a.jpg", "sub/../../a.jpg", "/etc/passwd", ".."])
def test_paths_leaving_the_tables_folder_are_refused_unless_allowed(outside, tmp_path):
    table = tmp_path / "data" / "pairs.csv"
    with pytest.raises(BadSample) as caught:
        image_path(table, outside, False, "row 2")
    assert caught.value.reason == "path_outside_root"
    assert caught.value.detail == (
        f"row 2: image path {outside!r} leaves {table.parent}, the folder of pairs.csv"
    )
    allowed = image_path(table, outside, True, "row 2")
    expected = Path(outside) if os.path.isabs(outside) else table.parent / outside
    assert allowed == expected


def test_a_path_that_is_not_utf8_is_a_malformed_row(tmp_path):
    with pytest.raises(BadSample) as caught:
        image_path(tmp_path / "t.csv", "caf\udce9.jpg", True, "row 5")
    assert caught.value.reason == "malformed_row"
