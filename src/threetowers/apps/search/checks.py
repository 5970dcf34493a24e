"""A search index checked as it is opened, so that a damaged one is refused with one message
(:class:`DamagedIndexError`, naming the file) instead of answering every query with an error
or a wrong result. In order: the manifest's fields; each file's sha256 against the manifest's,
before the file is parsed (indexes written before manifests recorded them skip this); then
every file's row count, width and offsets against the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from threetowers.apps.search import ann
from threetowers.apps.search.index_files import (
    DTYPES,
    INDEX_VERSION,
    IndexMismatch,
    Layout,
)
from threetowers.files.readback import DamagedFileError, file_sha256, read_json

MANIFEST_FIELDS = {  # what the engine reads from a manifest, and its type
    "fingerprint": str,
    "run": str,
    "step": int,
    "mode": str,
    "parts": list,
    "part_dim": int,
    "images": int,
    "captions": int,
    "dtype": str,
    "ann": dict,
}
FAISS_CLASSES = {"exact": faiss.IndexFlat, "ivf": faiss.IndexIVF, "hnsw": faiss.IndexHNSW}


class DamagedIndexError(DamagedFileError):
    """An index file that is not what the index's manifest says it is."""


def read_manifest(layout: Layout) -> dict:
    """The index's manifest, checked field by field, and each file against its recorded
    sha256 (before any of them is parsed)."""
    if not layout.manifest.is_file():
        raise FileNotFoundError(
            f"{layout.root} is not a complete index (no manifest.json); build one with "
            "`threetowers index RUN --images DIR --out INDEX` (re-running it resumes)"
        )
    try:
        manifest = read_json(layout.manifest, _rebuild(layout.root))
    except DamagedFileError as error:
        raise DamagedIndexError(str(error)) from None
    version = manifest.get("version")
    expect(isinstance(version, int), layout.manifest, "version: missing or not a number")
    if version != INDEX_VERSION:
        raise IndexMismatch(
            f"{layout.root} is an index of version {version}, this "
            f"threetowers reads version {INDEX_VERSION}; build it again"
        )
    _check_manifest(layout, manifest)
    _check_checksums(layout, manifest)
    return manifest


def read_table(path: Path, columns: list[str], rows: int, what: str) -> dict[str, list]:
    """A parquet table of the index with exactly ``rows`` rows."""
    with reading(path):
        table = pq.read_table(path, columns=columns).to_pydict()
    found = len(table[columns[0]])
    expect(found == rows, path, f"{found} rows; the manifest says {rows} {what}")
    return table


def _rebuild(root: Path) -> str:
    return (
        f"delete {root} and rebuild it with "
        f"`threetowers index RUN --images DIR (or --data SOURCE) --out {root}`"
    )


def _damaged(path: Path, problem: str) -> DamagedIndexError:
    return DamagedIndexError(f"{path} is damaged ({problem}); {_rebuild(path.parent)}")


def expect(condition: bool, path: Path, problem: str) -> None:
    if not condition:
        raise _damaged(path, problem)


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """A file that cannot be read as what it should be, as one refusal naming it."""
    if not path.is_file():  # FAISS says so in its own words
        raise _damaged(path, "missing")
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, pa.ArrowException) as error:
        # FAISS prefixes its messages with the C++ function and source line
        detail = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(error))
        raise _damaged(path, f"unreadable: {type(error).__name__}: {detail}") from None


def _check_manifest(layout: Layout, manifest: dict) -> None:
    path = layout.manifest
    fields = MANIFEST_FIELDS | ({"captions_ann": dict} if manifest.get("captions") else {})
    for name, kind in fields.items():
        value = manifest.get(name)
        typed = isinstance(value, kind) and not isinstance(value, bool)
        expect(typed, path, f"{name}: missing or not a JSON {kind.__name__}")
    parts = manifest["parts"]
    expect(bool(parts) and all(isinstance(p, str) for p in parts), path, "parts: not names")
    expect(manifest["part_dim"] > 0, path, "part_dim is not positive")
    if "part_dims" in manifest:  # absent from indexes written before frozen pairs
        dims = manifest["part_dims"]
        expect(
            isinstance(dims, list)
            and len(dims) == len(parts)
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims),
            path,
            f"part_dims: not one positive width for each of the {len(parts)} parts",
        )
        expect(
            dims[0] == manifest["part_dim"],
            path,
            f"part_dims starts with {dims[0]}, not part_dim {manifest['part_dim']} (the main "
            "pair's width)",
        )
    expect(manifest["images"] > 0, path, "images is not positive")
    expect(manifest["captions"] >= 0, path, "captions is negative")
    expect(manifest["dtype"] in DTYPES, path, f"dtype is not one of {DTYPES}")
    for name in ("ann", "captions_ann") if manifest["captions"] else ("ann",):
        with reading(path):
            record = ann.AnnRecord(**manifest[name])
        expect(record.kind in ann.KINDS, path, f"{name}: kind is not one of {ann.KINDS}")
        wanted = {"exact": set(), "ivf": {"nprobe"}, "hnsw": {"efSearch"}}[record.kind]
        expect(set(record.params) == wanted, path, f"{name}: params should be {wanted or {}}")
    checksums = manifest.get("sha256", {})
    expect(
        isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values()),
        path,
        "sha256 is not a table of file names and digests",
    )


def part_dims(manifest: dict) -> list[int]:
    """Each part's width in a checked manifest: ``part_dims``, or for an index written before
    frozen pairs (whose parts all had the model's embed_dim) ``part_dim`` for every part."""
    return manifest.get("part_dims") or [manifest["part_dim"]] * len(manifest["parts"])


def _files(layout: Layout, manifest: dict) -> list[Path]:
    files = [layout.vectors, layout.ann, layout.table, layout.thumbnail_offsets, layout.thumbnails]
    if manifest["captions"]:
        files += [layout.caption_vectors, layout.caption_ann, layout.caption_table]
    return files


def _check_checksums(layout: Layout, manifest: dict) -> None:
    """Each file's sha256 against the manifest's; an index written before the manifest
    recorded them (no ``sha256``) is checked by its shapes alone."""
    if "sha256" not in manifest:
        return
    for path in _files(layout, manifest):
        recorded = manifest["sha256"].get(path.name)
        expect(recorded is not None, layout.manifest, f"no sha256 of {path.name}")
        with reading(path):
            actual = file_sha256(path)
        expect(actual == recorded, path, "its sha256 is not the one its manifest recorded")


def check_vectors(path: Path, rows: int, width: int, dtype: str) -> None:
    with reading(path):
        vectors = np.load(path, mmap_mode="r")  # the header, and its size against the file's
        shape, stored = vectors.shape, vectors.dtype
        del vectors
    expect(shape == (rows, width), path, f"shape {shape}; the manifest says {(rows, width)}")
    expect(stored == np.dtype(dtype), path, f"{stored} values; the manifest says {dtype}")


def read_ann(path: Path, rows: int, width: int, kind: str) -> faiss.Index:
    with reading(path):
        index = ann.read_ann(path)
    expect(
        isinstance(index, FAISS_CLASSES[kind]) and index.metric_type == faiss.METRIC_INNER_PRODUCT,
        path,
        f"a {type(index).__name__}; the manifest says a {kind} inner-product index",
    )
    expect(index.d == width, path, f"{index.d} dimensions; the manifest says {width}")
    expect(index.ntotal == rows, path, f"{index.ntotal} rows; the manifest says {rows}")
    return index


def thumbnail_offsets(layout: Layout, images: int) -> np.ndarray:
    """Where each image's JPEG starts in thumbnails.bin (and the last ends)."""
    path = layout.thumbnail_offsets
    with reading(path):
        offsets = np.load(path)
    expect(
        offsets.shape == (images + 1,) and offsets.dtype.kind in "iu",
        path,
        f"{offsets.dtype} values of shape {offsets.shape}; should be {images + 1} integers",
    )
    expect(bool(offsets[0] == 0 and np.all(np.diff(offsets) >= 0)), path, "not increasing from 0")
    with reading(layout.thumbnails):
        size = layout.thumbnails.stat().st_size
    expect(
        int(offsets[-1]) == size,
        layout.thumbnails,
        f"{size} bytes; its offsets ({path.name}) end at {offsets[-1]}",
    )
    return offsets
