"""Frozen towers' feature caches: computed once, stored per unit of the data, streamed with it.

A frozen tower never sees augmentation, so its features of a sample never change: computed
once, they make LiT and 3T cost what CLIP costs (or less). A tower's cache is a folder named
by the tower's weights, preprocessing and storage dtype, holding per *unit* of the data (a
shard, a chunk of a table's rows, or a list of image files: ``units.py``) a ``.npy``
of features in the unit's sample order and a ``.json`` index: the unit's identity (its
files' paths, sizes and modification times), every sample's key and the samples that could
not be used. So:

* memory is O(batch), not O(dataset): a loader worker reads the rows of the samples it
  loads, by offset (``os.pread``), and opens only the units of its own shards;
* a changed shard recomputes that shard alone, and a killed build keeps its finished units;
* a row is read only when the sample's key matches the key stored at that row, so a cache
  never hands one sample's features to another.

:func:`build_caches` computes the missing units of several towers in one pass over the
images: each image is decoded once, each tower gets its own view. The ``.npy`` is written
first and the ``.json`` last, both atomically: an index means a complete unit. numpy's
``.npy`` rather than safetensors because a row's offset in it is known, so a worker reads a
row without mapping the file (mapped pages would count towards its memory). The files'
names and their check: ``layout.py``; their rows read back: ``streamed_features.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from threetowers.backbones.frozen import FrozenBackbone
from threetowers.data.caches.layout import (
    DTYPES,
    FORMAT,
    CacheSpec,
    unit_complete,
    unit_files,
)
from threetowers.data.caches.precision import tower_precision
from threetowers.data.caches.streamed_features import StreamedFeatures, reader
from threetowers.data.caches.units import Unit
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog, Skipped
from threetowers.data.transforms import PixelEvalTransform
from threetowers.errors import UserError
from threetowers.files import locks
from threetowers.files.atomic import remove_temporaries, save_npy, write_atomic
from threetowers.files.readback import file_sha256

log = logging.getLogger(__name__)


class _UnitViews(IterableDataset):
    """Each worker's share of the units, in batches of ``batch_size`` consecutive samples:
    (unit number, keys, {tower: uint8 views of the usable samples}, their positions in the
    unit, skipped (position, Skipped)). A unit is read by one worker, in order."""

    def __init__(self, units: list[Unit], views: dict, batch_size: int) -> None:
        self.units, self.views, self.batch_size = units, views, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for number in range(worker, len(self.units), workers):
            batch: list[tuple[str, object]] = []
            first = 0
            for item in self.units[number].samples():
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._views(number, first, batch)
                    first, batch = first + len(batch), []
            if batch or first == 0:  # an empty unit still sends one (empty) batch
                yield self._views(number, first, batch)

    def _views(self, number: int, first: int, batch: list[tuple[str, object]]):
        used = [i for i, (_, image) in enumerate(batch) if not isinstance(image, Skipped)]
        skipped = [(first + i, image) for i, (_, image) in enumerate(batch) if i not in used]
        pixels = {
            name: torch.stack([view(batch[i][1]) for i in used]) if used else None
            for name, view in self.views.items()
        }
        return number, [key for key, _ in batch], pixels, [first + i for i in used], skipped


class _UnitRows:
    """A unit's rows as its batches arrive, for the towers that lack it."""

    def __init__(self, unit: Unit, dims: dict[str, int]) -> None:
        self.unit, self.keys, self.bad = unit, [], {}
        self.rows = {name: np.zeros((unit.size, dim), np.float32) for name, dim in dims.items()}

    @property
    def complete(self) -> bool:
        return len(self.keys) == self.unit.size


def _as_is(item):
    return item


def build_caches(
    towers: Mapping[str, FrozenBackbone],
    units: Sequence[Unit],
    spec: CacheSpec,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    max_bad_fraction: float = 1.0,
    lock: bool = True,
) -> dict[str, StreamedFeatures]:
    """Each tower's cache of ``units``, computing the units any tower lacks (or whose bytes
    do not match their checksum) in one pass (each image decoded once). Bad samples have no
    features (training skips them too); more than ``max_bad_fraction`` of them stop the
    pass with :class:`BadDataError`. A process computing units into a tower's folder holds
    its lock: another one waits, then computes only what is still missing. ``lock=False``:
    the caller holds the folders for this process (a rank's share: ``sharded.py``)."""
    layout = {name: spec.folder(tower) for name, tower in towers.items()}

    def missing() -> dict[int, list[str]]:
        todo: dict[int, list[str]] = {}
        for name, tower in towers.items():
            folder, digest = layout[name]
            for number, unit in enumerate(units):
                npy, index, identity = unit_files(folder, unit)
                size, dim = unit.size, tower.feature_dim
                if not unit_complete(npy, index, identity, digest, size, dim, spec.dtype):
                    todo.setdefault(number, []).append(name)
        return todo

    todo = missing()
    with contextlib.ExitStack() as held:
        if todo and lock:
            for folder in sorted({folder for folder, _ in layout.values()}):
                held.enter_context(locks.waiting(folder, "feature cache"))
            todo = missing()  # what the writer we waited for left
        if todo:
            _compute(
                towers,
                units,
                todo,
                layout,
                spec,
                batch_size,
                num_workers,
                progress,
                max_bad_fraction,
            )
    return {
        name: reader(StreamedFeatures, name, *layout[name], units, tower.feature_dim, spec.dtype)
        for name, tower in towers.items()
    }


@torch.no_grad()
def _compute(towers, units, todo, layout, spec, batch_size, num_workers, progress, max_bad):
    numbers = sorted(todo)
    pending = [units[number] for number in numbers]
    names = sorted({name for missing in todo.values() for name in missing})
    views = {name: PixelEvalTransform(towers[name].preprocessing) for name in names}
    for name in names:
        folder = layout[name][0]
        folder.mkdir(parents=True, exist_ok=True)
        remove_temporaries(folder, only_dead_writers=True)  # shared by concurrent runs
    device = next(towers[names[0]].parameters()).device
    precision = tower_precision(spec.precision, device)
    total = sum(unit.size for unit in pending)
    what = f"caching {', '.join(names)} features"
    bad_data = BadSampleLog(max_bad, what, total)
    filling: dict[int, _UnitRows] = {}
    batches = DataLoader(
        _UnitViews(pending, views, batch_size),
        batch_size=None,
        num_workers=min(num_workers, len(pending)),
        collate_fn=_as_is,
    )
    with tqdm(total=total, disable=not progress, desc=what, unit="image") as bar:
        for index, keys, pixels, used, skipped in batches:
            number = numbers[index]
            dims = {name: towers[name].feature_dim for name in todo[number]}
            unit = filling.setdefault(number, _UnitRows(units[number], dims))
            bad_data.record(len(used), [record for _, record in skipped])
            bar.update(len(keys))
            unit.keys += keys
            unit.bad |= {str(p): [record.reason, record.detail] for p, record in skipped}
            if used:
                for name, rows in unit.rows.items():
                    prepared = towers[name].preprocessing.normalize_pixels(pixels[name])
                    with precision:  # the towers alone: the views stay exact
                        features = towers[name](prepared.to(device))
                    rows[used] = features.float().cpu().numpy()
            if unit.complete:
                _write(filling.pop(number), layout, spec.dtype)
    if bad_data.total:
        log.warning(bad_data.summary())
    if filling:
        raise UserError(
            f"{what}: {len(filling)} unit(s) read fewer samples than their headers promised; "
            "were the shards changed while caching?"
        )


def _write(unit: _UnitRows, layout: dict, dtype: str) -> None:
    for name, exact in unit.rows.items():
        folder, digest = layout[name]
        npy, index, identity = unit_files(folder, unit.unit)
        rows = exact.astype(DTYPES[dtype])
        if not np.isfinite(rows).all() and np.isfinite(exact).all():
            raise BadDataError(
                f"{name}'s features overflow {dtype} (largest magnitude "
                f"{np.abs(exact).max():.3g}); set data.cache_dtype=float32"
            )
        save_npy(npy, rows)
        meta = {
            "format": FORMAT,
            "tower": digest,
            "identity": identity,
            "keys": unit.keys,
            "bad": unit.bad,
            "sha256": file_sha256(npy),
        }
        write_atomic(index, json.dumps(meta))  # last: its presence means the unit is complete
