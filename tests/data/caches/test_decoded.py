"""Images decoded once hold exactly what decoding the files gives, bad files included."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch

from tests.helpers.bad_data import ODD_BUT_VALID, encoded
from tests.helpers.images import image_folder, noise
from threetowers.backbones.frozen import Preprocessing
from threetowers.data.benchmarks import ImageFiles
from threetowers.data.caches.decoded import DecodedImages, WholeImage, image_rows
from threetowers.data.sources.bad_samples import Skipped
from threetowers.data.sources.decode import load_image
from threetowers.data.transforms import PixelEvalTransform, eval_transform, train_transform

PRE = Preprocessing(10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="bicubic", crop_fraction=0.875)


def rows(dataset) -> list:
    return [dataset[index] for index in range(len(dataset))]


def assert_same_rows(got, want):
    assert len(got) == len(want)
    for (index, value), (want_index, want_value) in zip(got, want, strict=True):
        assert index == want_index
        if isinstance(want_value, Skipped):
            assert value == want_value
        else:
            assert value.dtype == torch.uint8 and torch.equal(value, want_value), index


@pytest.mark.parametrize("view", [PixelEvalTransform(PRE), WholeImage()], ids=["view", "whole"])
def test_rows_are_each_files_view_and_bad_files_are_skipped_alike(tmp_path, view):
    paths = image_folder(tmp_path / "images")
    live = rows(ImageFiles(paths, view))
    assert sum(isinstance(value, Skipped) for _, value in live) == 5  # 4 bad, 1 missing
    decoded = image_rows(paths, view, tmp_path / "cache")
    assert isinstance(decoded, DecodedImages)
    assert_same_rows(rows(decoded), live)

    # read again from the files, not rebuilt; a pickle (for loader workers) holds no pixels
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    again = image_rows(paths, view, tmp_path / "cache")
    assert_same_rows(rows(again), live)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stamps
    assert len(pickle.dumps(again)) < os.path.getsize(again.data)
    assert_same_rows(rows(pickle.loads(pickle.dumps(again))), live)
    assert not list((tmp_path / "cache").glob(".*tmp-*"))


def test_whole_images_give_the_transforms_of_the_decoded_file(tmp_path):
    """Pretraining crops the cached image: every transform must see the decoded pixels."""
    paths = image_folder(tmp_path / "images")
    decoded = image_rows(paths, WholeImage(), tmp_path / "cache")
    crops = train_transform(PRE, scale=(0.3, 1.0))
    checked = 0
    for index, pixels in rows(decoded):
        if isinstance(pixels, Skipped):
            continue
        cached, original = WholeImage.image(pixels), load_image(paths[index], "image")
        assert torch.equal(eval_transform(PRE)(cached), eval_transform(PRE)(original))
        rng, same_rng = np.random.default_rng(index), np.random.default_rng(index)
        assert torch.equal(crops(cached, rng), crops(original, same_rng))
        checked += 1
    assert checked == len(ODD_BUT_VALID) + 4


def test_an_edited_or_new_file_is_decoded_again(tmp_path):
    paths = image_folder(tmp_path / "images")
    view = PixelEvalTransform(PRE)
    before = image_rows(paths, view, tmp_path / "cache")
    edited = paths.index(tmp_path / "images" / "noise1.png")
    paths[edited].write_bytes(encoded(noise(30, 20, 99)))  # another size: another file size
    after = image_rows(paths, view, tmp_path / "cache")
    assert_same_rows(rows(after), rows(ImageFiles(paths, view)))
    assert not torch.equal(after[edited][1], before[edited][1])

    paths[-1].write_bytes(encoded(noise(12, 12, 5)))  # the missing file arrives
    arrived = image_rows(paths, view, tmp_path / "cache")
    assert isinstance(after[len(paths) - 1][1], Skipped)
    assert_same_rows(rows(arrived), rows(ImageFiles(paths, view)))


def _build(paths, cache_dir, queue) -> None:
    built = rows(image_rows(paths, WholeImage(), cache_dir))
    # numpy, pickled by value: a tensor would travel as a handle to this process's memory
    queue.put([value if isinstance(value, Skipped) else value.numpy() for _, value in built])


def test_two_processes_building_the_same_cache_at_once(tmp_path):
    paths = image_folder(tmp_path / "images") * 40  # long enough for the builds to overlap
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    builders = [context.Process(target=_build, args=(paths, tmp_path / "cache", queue))]
    builders.append(context.Process(target=_build, args=(paths, tmp_path / "cache", queue)))
    for builder in builders:
        builder.start()
    results = [queue.get(timeout=120) for _ in builders]
    for builder in builders:
        builder.join()
        assert builder.exitcode == 0
    live = rows(ImageFiles(paths, WholeImage()))
    for result in results:
        got = [value if isinstance(value, Skipped) else torch.from_numpy(value) for value in result]
        assert_same_rows(list(enumerate(got)), live)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".u8"]
