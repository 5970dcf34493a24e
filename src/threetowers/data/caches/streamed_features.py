"""A frozen tower's cached features read back row by row, in the loader worker that loads the
sample: memory is O(batch), not O(dataset). A row is read by offset (``os.pread``) rather
than memory-mapped, because mapped pages would count towards a worker's resident memory,
and only when the sample's key matches the key stored at that row, so a cache never hands
one sample's features to another.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from threetowers.data.caches.layout import npy_header, unit_files
from threetowers.data.sources.bad_samples import Skipped
from threetowers.errors import UserError
from threetowers.files.readback import read_json

T = TypeVar("T", bound="StreamedFeatures")

OPEN_UNITS = 8  # units a reader keeps open per process (a shuffle buffer spans a few shards)
# Units whose index (keys, bad samples) a reader keeps: a table is read in random order over
# all its units, and re-reading an index on every miss cost a sixth of a small model's step
# (reproduce preset, 3t) when only OPEN_UNITS of them were kept.
INDEXED_UNITS = 256


@dataclass(frozen=True)
class _UnitFile:
    start: int
    size: int
    npy: str
    index: str


class UnitMismatch(UserError, RuntimeError):
    """A cache unit does not hold what its dataset now holds (the data changed since)."""


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
