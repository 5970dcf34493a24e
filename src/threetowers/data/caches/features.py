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
row without mapping the file (mapped pages would count towards its memory).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from threetowers.backbones.frozen import FrozenBackbone
from threetowers.data.caches.identity import (
    spec_digest,
)
from threetowers.data.caches.units import Unit
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog, Skipped
from threetowers.data.transforms import PixelEvalTransform
from threetowers.files import locks
from threetowers.files.atomic import remove_temporaries, save_npy, write_atomic
from threetowers.files.readback import read_json

log = logging.getLogger(__name__)
T = TypeVar("T", bound="StreamedFeatures")

DTYPES = {"float16": np.float16, "float32": np.float32}
FORMAT = 1  # of a unit's index: any other is computed again
OPEN_UNITS = 8  # units a reader keeps open per process (a shuffle buffer spans a few shards)
# Units whose index (keys, bad samples) a reader keeps: a table is read in random order over
# all its units, and re-reading an index on every miss cost a sixth of a small model's step
# (reproduce preset, 3t) when only OPEN_UNITS of them were kept.
INDEXED_UNITS = 256


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _UnitFile:
    start: int
    size: int
    npy: str
    index: str


class UnitMismatch(RuntimeError):
    """A cache unit does not hold what its dataset now holds."""


class StreamedFeatures:
    """One frozen tower's features of a dataset, read row by row from its units' files.

    Picklable with no open file: each process opens the units it reads, at most
    :data:`OPEN_UNITS` at a time."""

    def __init__(self, name: str, fingerprint: str, units: list[_UnitFile], dim: int, dtype):
        self.name, self.fingerprint, self.units, self.dim = name, fingerprint, units, dim
        self.dtype = np.dtype(dtype)
        self.starts = [unit.start for unit in units]
        self._open: OrderedDict[int, int] = OrderedDict()  # unit -> its file descriptor
        self._indexes: OrderedDict[int, tuple[int, list[str], dict]] = OrderedDict()

    def __len__(self) -> int:
        return sum(unit.size for unit in self.units)

    def __getstate__(self) -> dict:
        # file descriptors stay in their process
        return self.__dict__ | {"_open": OrderedDict(), "_indexes": OrderedDict()}

    def __del__(self) -> None:
        for fd in self._open.values():
            with contextlib.suppress(OSError, TypeError):  # TypeError: at interpreter exit
                os.close(fd)

    @property
    def opened(self) -> list[str]:
        """The units' ``.npy`` files this process has open (the last :data:`OPEN_UNITS`)."""
        return [self.units[unit].npy for unit in self._open]

    def lookup(self, row: int, key: str) -> torch.Tensor | Skipped:
        """float32 features of dataset row ``row``, whose sample is ``key``; the
        :class:`Skipped` record of a sample that was unusable when the unit was built."""
        unit = bisect.bisect_right(self.starts, row) - 1
        position = row - self.starts[unit] if unit >= 0 else -1
        if not 0 <= position < self.units[unit].size:
            raise UnitMismatch(f"{self.name} cache: row {row} is outside the dataset")
        fd, offset, keys, bad = self._unit(unit)
        if keys[position] != key:
            raise UnitMismatch(
                f"{self.name} cache {self.units[unit].index}: row {position} holds sample "
                f"{keys[position]!r}, not {key!r}; the data changed since it was cached - "
                "run `threetowers cache` again (or delete the folder) to rebuild it"
            )
        if str(position) in bad:
            return Skipped(key, *bad[str(position)])
        return self._read(fd, offset, position)

    def _read(self, fd: int, offset: int, position: int) -> torch.Tensor:
        """Row ``position`` of an open unit, as float32."""
        width = self.dim * self.dtype.itemsize
        data = os.pread(fd, width, offset + position * width)
        return torch.from_numpy(np.frombuffer(data, self.dtype).astype(np.float32))

    def features(self, row: int, key: str) -> torch.Tensor:
        """Like :meth:`lookup`, for a sample the data still has as usable (training's)."""
        found = self.lookup(row, key)
        if isinstance(found, Skipped):
            raise UnitMismatch(
                f"{self.name} cache: sample {key!r} was unusable when cached ({found.reason}: "
                f"{found.detail}) but decodes now; the data changed - rebuild the cache"
            )
        return found

    def _unit(self, unit: int) -> tuple[int, int, list[str], dict]:
        """The unit's open file, its rows' offset, its keys and its bad samples."""
        files = self.units[unit]
        if unit in self._indexes:
            self._indexes.move_to_end(unit)
        else:
            meta = read_json(files.index)
            with open(files.npy, "rb") as handle:
                *_, offset = npy_header(handle)
            self._indexes[unit] = (offset, meta["keys"], meta["bad"])
            if len(self._indexes) > INDEXED_UNITS:
                self._indexes.popitem(last=False)
        if unit in self._open:
            self._open.move_to_end(unit)
        else:
            self._open[unit] = os.open(files.npy, os.O_RDONLY)
            if len(self._open) > OPEN_UNITS:
                os.close(self._open.popitem(last=False)[1])
        return self._open[unit], *self._indexes[unit]


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class CacheSpec:
    """Where and how the towers' caches are stored. ``context`` adds what else features
    depend on (evaluation: the batch size and device h ran with) and ``kind`` marks the
    folders (``-eval``)."""

    directory: str | Path
    dtype: str = "float16"
    context: Mapping = field(default_factory=dict)
    kind: str = ""

    def folder(self, tower: FrozenBackbone) -> tuple[Path, str]:
        """The tower's folder (by its backbone's name, so runs naming it apart share it) and
        its digest: weights, preprocessing, dtype, context."""
        spec = {"tower": tower.digest(), "dtype": self.dtype, **self.context}
        digest = spec_digest(spec)
        return Path(self.directory).expanduser() / f"{tower.name}{self.kind}-{digest[:16]}", digest


def unit_files(folder: Path, unit: Unit) -> tuple[Path, Path, dict]:
    identity = unit.identity()
    stem = spec_digest(identity)[:24]
    return folder / f"{stem}.npy", folder / f"{stem}.json", identity


def unit_complete(npy: Path, index: Path, identity: dict, tower: str, rows, dim, dtype) -> bool:
    """Whether a unit's files hold what they should: ``rows`` rows (None: one per key, as a
    caption unit has) of ``dim`` in ``dtype``, with the bytes its checksum records (a flipped
    byte would train on wrong features; the check costs 0.35% of building the unit,
    benchmarks/cache_verification.py)."""
    try:
        meta = read_json(index)
        with open(npy, "rb") as handle:
            shape, stored, _ = npy_header(handle)
        keys = len(meta.get("keys", ()))
        good = (
            meta.get("format") == FORMAT
            and meta.get("tower") == tower
            and meta.get("identity") == identity
            and shape == (keys if rows is None else rows, dim)
            and keys == shape[0]
            and stored == np.dtype(dtype)
        )
        if good and meta.get("sha256") != file_sha256(npy):
            log.warning(
                "feature cache %s: its bytes changed since it was written; computing it again",
                npy,
            )
            good = False
        return good
    except (OSError, ValueError, KeyError, TypeError):
        return False


def npy_header(handle) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of an open ``.npy`` file; ValueError if it is none."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0
    if version != (1, 0):
        read = np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if fortran:
        raise ValueError("a cache .npy is C-ordered")
    return shape, dtype, handle.tell()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
) -> dict[str, StreamedFeatures]:
    """Each tower's cache of ``units``, computing the units any tower lacks (or whose bytes
    do not match their checksum) in one pass (each image decoded once). Bad samples have no
    features (training skips them too); more than ``max_bad_fraction`` of them stop the
    pass with :class:`BadDataError`. A process computing units into a tower's folder holds
    its lock: another one waits, then computes only what is still missing."""
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

    if missing():
        with contextlib.ExitStack() as held:
            for folder in sorted({folder for folder, _ in layout.values()}):
                held.enter_context(locks.waiting(folder, "feature cache"))
            if todo := missing():
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


def reader(kind: type[T], name: str, folder: Path, digest: str, units, dim: int, dtype: str) -> T:
    """A reader of a tower's complete cache in ``folder``; its fingerprint names the tower
    (``digest``) and every unit's file."""
    files = []
    for unit in units:
        npy, index, _ = unit_files(folder, unit)
        files.append(_UnitFile(unit.start, unit.size, str(npy), str(index)))
    stems = [Path(f.index).stem for f in files]
    fingerprint = hashlib.sha256(json.dumps([digest, stems]).encode()).hexdigest()
    return kind(name, fingerprint, files, dim, dtype)


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
                    rows[used] = towers[name](prepared.to(device)).float().cpu().numpy()
            if unit.complete:
                _write(filling.pop(number), layout, spec.dtype)
    if bad_data.total:
        log.warning(bad_data.summary())
    if filling:
        raise RuntimeError(
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
