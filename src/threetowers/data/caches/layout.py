"""A cache unit's files: a ``.npy`` of rows and a ``.json`` index beside it, named by the
unit's identity inside a folder named by the tower (:class:`CacheSpec`), and the check that
they are complete and unchanged. The feature caches (``features.py``) and the caption caches
(``captions.py``) store their units alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from threetowers.backbones.frozen import FrozenBackbone
from threetowers.data.caches.identity import spec_digest
from threetowers.data.caches.units import Unit
from threetowers.files.readback import file_sha256, read_json

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}
FORMAT = 1  # of a unit's index: any other is computed again


@dataclass(frozen=True)
class CacheSpec:
    """Where and how the towers' caches are stored. ``context`` adds what else features
    depend on (evaluation: the batch size and device h ran with), ``kind`` marks the
    folders (``-eval``) and ``precision`` is what the towers compute in (``precision.py``)."""

    directory: str | Path
    dtype: str = "float16"
    context: Mapping = field(default_factory=dict)
    kind: str = ""
    precision: str = "fp32"

    def folder(self, tower: FrozenBackbone) -> tuple[Path, str]:
        """The tower's folder (by its backbone's name, so runs naming it apart share it) and
        its digest: weights, preprocessing, dtype, context, and a precision other than fp32
        (fp32 caches keep the names they had before precision was a choice)."""
        spec = {"tower": tower.digest(), "dtype": self.dtype, **self.context}
        if self.precision != "fp32":
            spec["precision"] = self.precision
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
