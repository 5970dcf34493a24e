"""Images decoded once: each file's view as uint8 rows of one memory-mapped file.

Decoding a PNG costs more than anything done with its pixels afterwards in an evaluation or
a small classifier's step, and the same files are decoded again and again: the benchmark
images by every run's evaluation, a labelled set by every epoch of ``pretrain``. Like
:mod:`preload` for training pairs, :func:`image_rows` can run every file through its view
once into ``cache_dir``, under a name made from the files (paths, sizes, modification
times) and the view, so an edited file or another view never reads stale pixels. Rows may
differ in shape (:class:`WholeImage` keeps each image at its own size). An unusable image
keeps its reason and is skipped and counted as when it is read live.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from threetowers.data.benchmarks import ImageFiles
from threetowers.data.caches.identity import cache_base, files_digest
from threetowers.data.sources.bad_samples import Skipped
from threetowers.files.atomic import publish, remove_temporaries, temporary_path, write_atomic
from threetowers.files.readback import read_json


class WholeImage:
    """The view that keeps the decoded image whole: uint8 (H, W, 3) pixels.

    :meth:`image` turns them back into the decoded image, pixel for pixel, so a transform
    (a random crop, a resize) gives the same tensor as on the file's own decoding."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image, dtype=np.uint8))

    @staticmethod
    def image(pixels: torch.Tensor) -> Image.Image:
        return Image.fromarray(pixels.numpy())

    def __repr__(self) -> str:  # part of the cache name: must not hold an address
        return "WholeImage()"


class DecodedImages(Dataset):
    """:class:`ImageFiles`' items, read from the cache: (index, uint8 view) or
    (index, Skipped) for an image that could not be used."""

    def __init__(
        self,
        paths: Sequence[Path],
        data: Path,
        shapes: list[list[int] | None],
        bad: dict[int, tuple[str, str]],
    ) -> None:
        self.keys = [str(path) for path in paths]  # as ImageFiles names skipped images
        self.data, self.shapes, self.bad = data, shapes, bad
        sizes = [math.prod(shape) if shape is not None else 0 for shape in shapes]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._pixels: np.ndarray | None = None  # opened on first read, in each process

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | Skipped]:
        if index in self.bad:
            return index, Skipped(self.keys[index], *self.bad[index])
        if self._pixels is None:
            self._pixels = np.memmap(self.data, dtype=np.uint8, mode="r")
        row = self._pixels[self.starts[index] : self.starts[index + 1]]
        return index, torch.from_numpy(np.array(row).reshape(self.shapes[index]))

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_pixels": None}  # a pickled memmap is a copy of the file


def image_rows(
    paths: Sequence[str | Path],
    view: Callable[[Image.Image], torch.Tensor],
    cache_dir: str | Path | None,
    num_workers: int = 0,
    progress: bool = False,
) -> ImageFiles | DecodedImages:
    """(index, ``view(image)``) or (index, Skipped) for each file: with ``cache_dir``, decoded
    once into it (``view`` must return uint8 and have a repr that names it), else on every
    read. ``num_workers`` loader processes decode when the cache is built."""
    if cache_dir is None:
        return ImageFiles(paths, view)
    paths = [Path(path) for path in paths]
    base = cache_base(cache_dir, "images", {"files": files_digest(paths), "view": repr(view)})
    data, index = base.with_suffix(".u8"), base.with_suffix(".json")
    if not index.exists():
        _build(ImageFiles(paths, view), data, index, num_workers, progress)
    meta = read_json(index)
    bad = {int(row): (reason, detail) for row, (reason, detail) in meta["bad"].items()}
    return DecodedImages(paths, data, meta["shapes"], bad)


def _as_arrays(items: list[tuple[int, torch.Tensor | Skipped]]) -> list[tuple]:
    return [(row, p if isinstance(p, Skipped) else p.numpy()) for row, p in items]


def _build(files: ImageFiles, data: Path, index: Path, num_workers: int, progress: bool) -> None:
    data.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(data.parent, only_dead_writers=True)  # shared by concurrent runs
    shapes: list[list[int] | None] = []
    bad: dict[int, tuple[str, str]] = {}
    tmp = temporary_path(data)
    # In order, in chunks of numpy arrays: one tensor at a time through a worker's queue costs
    # a shared-memory file per image, more than decoding it (one worker, 64 px world images,
    # one run: 3.6x faster in chunks, the same bytes).
    chunks = DataLoader(files, batch_size=64, num_workers=num_workers, collate_fn=_as_arrays)
    bar = tqdm(total=len(files), disable=not progress, desc="decoding")
    with open(tmp, "wb") as out:
        for row, pixels in (item for chunk in chunks for item in chunk):
            bar.update()
            if isinstance(pixels, Skipped):
                shapes.append(None)
                bad[row] = (pixels.reason, pixels.detail)
                continue
            if pixels.dtype != np.uint8:
                raise TypeError(f"a cached view must return uint8 pixels, not {pixels.dtype}")
            shapes.append(list(pixels.shape))
            out.write(pixels.tobytes())
        bar.close()
        out.flush()
        os.fsync(out.fileno())
    publish(tmp, data)
    # written last: its presence means the pixels are complete
    write_atomic(index, json.dumps({"shapes": shapes, "bad": bad}))
