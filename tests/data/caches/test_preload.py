"""Preloaded pairs hold exactly f's view of every image and every caption, cached once."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.helpers.runs import tiny_run_config
from tests.helpers.world import TINY
from threetowers.backbones.frozen import Preprocessing
from threetowers.config import ConfigError
from threetowers.data.caches import preload
from threetowers.data.caches.preload import preload_pairs
from threetowers.data.pipeline import TrainingData, open_data
from threetowers.data.sources.pairs import iter_pairs
from threetowers.data.transforms import PixelEvalTransform
from threetowers.model.build import build_model
from threetowers.project.world.default import default_world
from threetowers.project.world.generate import write_world
from threetowers.trainer.start import towers_of

VIEW = Preprocessing(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="bicubic", crop_fraction=1.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    world = write_world(tmp_path_factory.mktemp("world"), TINY).parent
    return sorted((world / "pairs").glob("train-*.tar"))


def test_preloaded_rows_are_the_view_of_each_image_with_all_captions(shards, tmp_path):
    view = PixelEvalTransform(VIEW)
    table = preload_pairs(shards, view, tmp_path, progress=False)
    originals = list(iter_pairs(shards))
    assert len(table) == len(originals) == TINY.train_pairs
    for index, original in enumerate(originals):
        row = table[index]
        assert row.key == original.key and row.captions == original.captions
        assert len(row.captions) == TINY.captions_per_image
        assert torch.equal(row.image, view(original.image))

    # cached: a second call reads the same file; another view gets its own
    files = sorted(p.name for p in tmp_path.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert torch.equal(
        preload_pairs(shards, view, tmp_path, progress=False)[3].image, table[3].image
    )
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    other = PixelEvalTransform(Preprocessing(16, VIEW.mean, VIEW.std, crop_fraction=1.0))
    assert preload_pairs(shards, other, tmp_path, progress=False)[0].image.shape == (3, 16, 16)
    assert len(list(tmp_path.iterdir())) == len(files) + 2
    assert not list(tmp_path.glob("*.tmp-*"))


def test_captions_only_table_for_runs_that_read_no_image(shards, tmp_path):
    table = preload_pairs(shards, None, tmp_path, progress=False)
    assert table[0].image.numel() == 0 and not list(tmp_path.glob("*.npy"))
    assert table[5].captions == list(iter_pairs(shards))[5].captions


def test_training_batches_from_preloaded_pairs_equal_the_decoded_views(tmp_path):
    cfg = tiny_run_config(
        tmp_path / "world", tmp_path / "cache", "data.augment=false", "data.preload=true"
    )
    model = build_model(cfg)
    opened = open_data(cfg, tmp_path / "run", default_world(cfg))
    data = TrainingData(cfg, opened, towers_of(model), progress=False)
    batch = next(data.batches(epoch=0, start_batch=0))
    pre = model.image_preprocessing
    decoded = {pair.id: pair.image for pair in iter_pairs(data.source)}
    expected = torch.stack([PixelEvalTransform(pre)(decoded[id_]) for id_ in batch["ids"]])
    assert batch["images"].dtype == torch.uint8  # the device normalises it
    assert torch.equal(batch["images"], expected)
    assert batch["tokens"].shape[0] == len(batch["ids"]) == cfg.data.batch_size


def test_preload_with_augmentation_is_refused(tmp_path):
    cfg = tiny_run_config(tmp_path / "world", tmp_path / "cache", "data.preload=true")
    opened = open_data(cfg, tmp_path / "run", default_world(cfg))
    with pytest.raises(ConfigError, match="data.augment=false"):
        TrainingData(cfg, opened, towers_of(build_model(cfg)), progress=False)


def test_a_full_disk_is_one_message_before_the_preload_not_a_sigbus(shards, small_disk):
    disk = small_disk(512)  # the view below needs 40 x 3 x 128 x 128 bytes: ~1.9 MiB
    command = [sys.executable, "-c", PRELOAD, str(disk), *map(str, shards)]
    root = Path(__file__).parents[3]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr  # a SIGBUS would end it with -7
    assert done.stdout.startswith(
        f"NoSpaceError: not enough disk space in {disk} for the preloaded images "
        "(data.preload): it needs about 1.9 MiB, "
    )
    assert done.stdout.rstrip().endswith(
        "free some space and re-run the same command (finished work is kept)"
    )
    assert [p.name for p in disk.iterdir()] == [".lock"]  # nothing half-written but the lock
    small_disk.grow(disk, 4096)
    done = subprocess.run(command, capture_output=True, text=True, cwd=root)
    assert done.stdout.strip() == "preloaded 40", done.stderr


PRELOAD = """
import sys
from threetowers.files.atomic import NoSpaceError
from threetowers.backbones.frozen import Preprocessing
from threetowers.data.caches.preload import preload_pairs
from threetowers.data.transforms import PixelEvalTransform

view = PixelEvalTransform(Preprocessing(128, (0.5,) * 3, (0.5,) * 3, crop_fraction=1.0))
try:
    table = preload_pairs(sys.argv[2:], view, sys.argv[1], progress=False)
    print("preloaded", len(table))
except NoSpaceError as error:
    print(f"NoSpaceError: {error}")
"""


def test_a_second_preload_waits_for_the_first_and_decodes_nothing(shards, tmp_path, caplog):
    """torchrun's ranks preload at once: one writes the pixels, the others wait and read."""
    view = PixelEvalTransform(VIEW)
    writer = subprocess.Popen(  # another rank preloading the same pairs, slowly
        [sys.executable, "-c", SLOW_PRELOAD, str(tmp_path), *map(str, shards)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3],
    )
    assert writer.stdout.readline().strip() == "preloading"
    with (
        mock.patch.object(preload, "_build", side_effect=AssertionError("built twice")),
        caplog.at_level(logging.INFO, logger="threetowers"),
    ):
        table = preload_pairs(shards, view, tmp_path, progress=False)
    assert writer.wait() == 0
    assert f"(pid {writer.pid}) is writing this preloaded pairs; waiting" in caplog.text
    assert torch.equal(table[0].image, view(next(iter_pairs(shards)).image))


SLOW_PRELOAD = """
import sys, time
from tests.data.caches.test_preload import VIEW
from threetowers.data.caches import preload
from threetowers.data.transforms import PixelEvalTransform

build = preload._build
def slowly(*args):
    print("preloading", flush=True)
    time.sleep(1.5)
    build(*args)
preload._build = slowly
preload.preload_pairs(sys.argv[2:], PixelEvalTransform(VIEW), sys.argv[1], progress=False)
"""
