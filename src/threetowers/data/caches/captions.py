"""A frozen text tower's features of every caption of a dataset, stored per unit, by text.

Each visit of a sample draws one of its captions, so a text tower's cache holds all of them:
per unit (shard or table chunk, as ``features.py`` cuts the data) a ``.npy`` with one row per
distinct caption of the unit's samples and a ``.json`` index listing each row's caption
digest. A loader worker finds the unit from the sample's row, then the caption's row from its
digest: only the captions of the units it reads are held, at most
``streamed_features.INDEXED_UNITS`` units at a time. Built in one pass of batched captions,
unit by unit (no image is decoded), resumable like the image caches; the files are written
the same way (``.npy`` first, the index last).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.data.caches.layout import (
    DTYPES,
    CacheSpec,
    unit_complete,
    unit_files,
)
from threetowers.data.caches.layout import (
    FORMAT as INDEX_FORMAT,
)
from threetowers.data.caches.precision import tower_precision
from threetowers.data.caches.streamed_features import StreamedFeatures, UnitMismatch, reader
from threetowers.data.caches.units import Unit
from threetowers.files import locks
from threetowers.files.atomic import remove_temporaries, save_npy, write_atomic
from threetowers.files.readback import file_sha256

log = logging.getLogger(__name__)


def caption_digest(caption: str) -> str:
    """The key of a caption's row (its text's sha256, surrogates kept)."""
    return hashlib.sha256(caption.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class CaptionFeatures(StreamedFeatures):
    """A text tower's features, read by (the sample's dataset row, the caption)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._by_digest: dict[int, dict[str, int]] = {}  # open units: caption digest -> row

    def caption_features(self, row: int, caption: str) -> torch.Tensor:
        unit = bisect.bisect_right(self.starts, row) - 1
        if unit < 0 or not 0 <= row - self.starts[unit] < self.units[unit].size:
            raise UnitMismatch(f"{self.name} cache: row {row} is outside the dataset")
        fd, offset, keys, _ = self._unit(unit)
        positions = self._positions(unit, keys)
        position = positions.get(caption_digest(caption))
        if position is None:
            raise UnitMismatch(
                f"{self.name} cache {self.units[unit].index} has no row for the caption "
                f"{caption[:60]!r}; the data changed since it was cached - run `threetowers "
                "cache` again (or delete the folder) to rebuild it"
            )
        return self._read(fd, offset, position)

    def _positions(self, unit: int, keys: list[str]) -> dict[str, int]:
        if unit not in self._by_digest:  # only the indexed units' tables are kept
            self._by_digest = {u: t for u, t in self._by_digest.items() if u in self._indexes}
            self._by_digest[unit] = {key: position for position, key in enumerate(keys)}
        return self._by_digest[unit]

    def __getstate__(self) -> dict:
        return super().__getstate__() | {"_by_digest": {}}


@torch.no_grad()
def build_caption_caches(
    towers: Mapping[str, FrozenTextEncoder],
    units: Sequence[Unit],
    spec: CacheSpec,
    batch_size: int = 256,
    progress: bool = True,
    lock: bool = True,
) -> dict[str, CaptionFeatures]:
    """Each text tower's cache of every caption of ``units``, computing the units that are
    missing or whose bytes do not match their checksum (under the folder's lock unless
    ``lock=False``, as :func:`~threetowers.data.caches.features.build_caches` does)."""
    out = {}
    for name, tower in towers.items():
        folder, digest = spec.folder(tower)
        dim = tower.feature_dim
        todo = _missing(units, folder, digest, dim, spec.dtype)
        with contextlib.ExitStack() as held:
            if todo and lock:
                held.enter_context(locks.waiting(folder, "feature cache"))
                todo = _missing(units, folder, digest, dim, spec.dtype)
            if todo:
                folder.mkdir(parents=True, exist_ok=True)
                remove_temporaries(folder, only_dead_writers=True)  # shared by concurrent runs
                device = next(tower.parameters()).device
                with tower_precision(spec.precision, device):
                    for unit in tqdm(todo, disable=not progress, desc=f"caching {name} captions"):
                        _build_unit(tower, unit, folder, digest, spec.dtype, batch_size)
        out[name] = reader(CaptionFeatures, name, folder, digest, units, dim, spec.dtype)
    return out


def _missing(units: Sequence[Unit], folder: Path, digest: str, dim: int, dtype: str) -> list[Unit]:
    return [
        unit
        for unit in units
        if not unit_complete(*unit_files(folder, unit), digest, None, dim, dtype)
    ]


def _build_unit(tower, unit: Unit, folder: Path, digest: str, dtype: str, batch_size: int):
    texts = sorted({caption for captions in unit.captions() for caption in captions})
    rows = np.zeros((len(texts), tower.feature_dim), np.float32)
    for start in range(0, len(texts), batch_size):
        features = tower(texts[start : start + batch_size])  # on the tower's device
        rows[start : start + batch_size] = features.float().cpu().numpy()
    npy, index, identity = unit_files(folder, unit)
    save_npy(npy, rows.astype(DTYPES[dtype]))
    meta = {
        "format": INDEX_FORMAT,
        "tower": digest,
        "identity": identity,
        "keys": [caption_digest(text) for text in texts],
        "bad": {},
        "sha256": file_sha256(npy),
    }
    write_atomic(index, json.dumps(meta))  # last: its presence means the unit is complete
