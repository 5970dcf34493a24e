"""Search an index: queries embedded by the run that built it, weighted at query time.

:class:`SearchIndex` reads an index directory (build.py) and answers ``search(query,
weights, k)``; :class:`QueryEncoder` embeds a text or an image with the run. A query carries
its run's fingerprint, and an index refuses a query embedded by another run: the vectors
would be in another space and the results meaningless.

An index is checked once, when it is opened, so that a damaged one is refused with one
message (:class:`DamagedIndexError`, naming the file) instead of answering every query with
an error or a wrong result: the manifest's fields; each file's sha256 against the manifest's,
before the file is parsed (indexes written before manifests recorded them skip this); then
every file's row count, width and offsets against the manifest.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from threetowers.evaluation.inputs import decoded_inputs
from threetowers.evaluation.suite import embed_inputs, embed_texts
from threetowers.readback import DamagedFileError, read_json
from threetowers.runs.trained import TrainedRun
from threetowers.search import ann
from threetowers.search.build import DTYPES, INDEX_VERSION, IndexMismatch, Layout, file_sha256
from threetowers.search.parts import Parts, weighted

TARGETS = ("images", "captions")
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


@dataclass(frozen=True)
class Query:
    """One query's parts, concatenated unweighted (like an index row), and whose they are."""

    vector: np.ndarray
    fingerprint: str


@dataclass(frozen=True)
class Hit:
    id: str  # the image's id (for a caption: its image's)
    score: float  # Σ_p a_p ⟨x_p, y_p⟩
    caption: str | None  # the caption found (captions), or the image's first caption


class SearchIndex:
    def __init__(self, directory: str | Path) -> None:
        self.layout = layout = Layout(Path(directory))
        if not layout.manifest.is_file():
            raise FileNotFoundError(
                f"{layout.root} is not a complete index (no manifest.json); build one with "
                "`threetowers index RUN --images DIR --out INDEX` (re-running it resumes)"
            )
        try:
            self.manifest = manifest = read_json(layout.manifest, _rebuild(layout.root))
        except DamagedFileError as error:
            raise DamagedIndexError(str(error)) from None
        version = manifest.get("version")
        _expect(isinstance(version, int), layout.manifest, "version: missing or not a number")
        if version != INDEX_VERSION:
            raise IndexMismatch(
                f"{layout.root} is an index of version {version}, this "
                f"threetowers reads version {INDEX_VERSION}; build it again"
            )
        _check_manifest(layout, manifest)
        _check_checksums(layout, manifest)  # before any file is parsed
        width = len(manifest["parts"]) * manifest["part_dim"]
        _check_vectors(layout.vectors, manifest["images"], width, manifest["dtype"])
        with _reading(layout.table):
            table = pq.read_table(layout.table, columns=["id", "caption"]).to_pydict()
        rows = f"{len(table['id'])} rows; the manifest says {manifest['images']} images"
        _expect(len(table["id"]) == manifest["images"], layout.table, rows)
        self.ids: list[str] = table["id"]
        self.first_captions: list[str | None] = table["caption"]
        self.row_of = {image_id: row for row, image_id in enumerate(self.ids)}
        self.index = _read_ann(layout.ann, manifest["images"], width, manifest["ann"]["kind"])
        self.record = ann.AnnRecord(**manifest["ann"])
        self.captions: list[str] = []
        if manifest["captions"]:
            count = manifest["captions"]
            _check_vectors(layout.caption_vectors, count, width, manifest["dtype"])
            with _reading(layout.caption_table):
                captions = pq.read_table(layout.caption_table).to_pydict()
                self.captions, self.caption_owners = captions["caption"], captions["image_row"]
            rows = f"{len(self.captions)} rows; the manifest says {count} captions"
            _expect(len(self.captions) == count, layout.caption_table, rows)
            owners = np.asarray(self.caption_owners)
            _expect(
                owners.dtype.kind in "iu" and 0 <= owners.min() and owners.max() < len(self),
                layout.caption_table,
                f"image_row should hold rows 0..{len(self) - 1}",
            )
            kind = manifest["captions_ann"]["kind"]
            self.caption_index = _read_ann(layout.caption_ann, count, width, kind)
            self.caption_record = ann.AnnRecord(**manifest["captions_ann"])
        self.offsets = _thumbnail_offsets(layout, manifest["images"])
        with _reading(layout.thumbnails):
            self._thumbnails = np.memmap(layout.thumbnails, dtype=np.uint8, mode="r")

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return len(self.ids)

    def search(
        self,
        query: Query,
        weights: Mapping[str, float],
        k: int,
        target: str = "images",
    ) -> list[Hit]:
        """The ``k`` best images (or captions) for ``query`` under the mixture ``weights``."""
        if query.fingerprint != self.fingerprint:
            raise IndexMismatch(
                f"the query was embedded by a run with fingerprint {query.fingerprint}, the "
                f"index {self.layout.root} by {self.fingerprint} ({self.manifest['run']}): "
                "search an index with the run that built it"
            )
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target == "captions" and not self.captions:
            raise ValueError(f"{self.layout.root} holds no captions (indexed from image files)")
        names, dim = self.manifest["parts"], self.manifest["part_dim"]
        vector = weighted(query.vector[None], names, dim, weights)
        if target == "images":
            scores, rows = ann.ann_search(self.index, self.record, vector, min(k, len(self)))
            return [
                Hit(self.ids[r], float(s), self.first_captions[r])
                for s, r in zip(scores[0], rows[0], strict=True)
                if r >= 0
            ]
        k = min(k, len(self.captions))
        scores, rows = ann.ann_search(self.caption_index, self.caption_record, vector, k)
        return [
            Hit(self.ids[self.caption_owners[r]], float(s), self.captions[r])
            for s, r in zip(scores[0], rows[0], strict=True)
            if r >= 0
        ]

    def thumbnail(self, image_id: str) -> bytes | None:
        """The stored JPEG of the image ``image_id``; None for an id the index lacks."""
        row = self.row_of.get(image_id)
        if row is None:
            return None
        return bytes(self._thumbnails[self.offsets[row] : self.offsets[row + 1]])


def _rebuild(root: Path) -> str:
    return (
        f"delete {root} and rebuild it with "
        f"`threetowers index RUN --images DIR (or --data SOURCE) --out {root}`"
    )


def _damaged(path: Path, problem: str) -> DamagedIndexError:
    return DamagedIndexError(f"{path} is damaged ({problem}); {_rebuild(path.parent)}")


def _expect(condition: bool, path: Path, problem: str) -> None:
    if not condition:
        raise _damaged(path, problem)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
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
        _expect(typed, path, f"{name}: missing or not a JSON {kind.__name__}")
    parts = manifest["parts"]
    _expect(bool(parts) and all(isinstance(p, str) for p in parts), path, "parts: not names")
    _expect(manifest["part_dim"] > 0, path, "part_dim is not positive")
    _expect(manifest["images"] > 0, path, "images is not positive")
    _expect(manifest["captions"] >= 0, path, "captions is negative")
    _expect(manifest["dtype"] in DTYPES, path, f"dtype is not one of {DTYPES}")
    for name in ("ann", "captions_ann") if manifest["captions"] else ("ann",):
        with _reading(path):
            record = ann.AnnRecord(**manifest[name])
        _expect(record.kind in ann.KINDS, path, f"{name}: kind is not one of {ann.KINDS}")
        wanted = {"exact": set(), "ivf": {"nprobe"}, "hnsw": {"efSearch"}}[record.kind]
        _expect(set(record.params) == wanted, path, f"{name}: params should be {wanted or {}}")
    checksums = manifest.get("sha256", {})
    _expect(
        isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values()),
        path,
        "sha256 is not a table of file names and digests",
    )


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
        _expect(recorded is not None, layout.manifest, f"no sha256 of {path.name}")
        with _reading(path):
            actual = file_sha256(path)
        _expect(actual == recorded, path, "its sha256 is not the one its manifest recorded")


def _check_vectors(path: Path, rows: int, width: int, dtype: str) -> None:
    with _reading(path):
        vectors = np.load(path, mmap_mode="r")  # the header, and its size against the file's
        shape, stored = vectors.shape, vectors.dtype
        del vectors
    _expect(shape == (rows, width), path, f"shape {shape}; the manifest says {(rows, width)}")
    _expect(stored == np.dtype(dtype), path, f"{stored} values; the manifest says {dtype}")


def _read_ann(path: Path, rows: int, width: int, kind: str) -> faiss.Index:
    with _reading(path):
        index = ann.read_ann(path)
    _expect(
        isinstance(index, FAISS_CLASSES[kind]) and index.metric_type == faiss.METRIC_INNER_PRODUCT,
        path,
        f"a {type(index).__name__}; the manifest says a {kind} inner-product index",
    )
    _expect(index.d == width, path, f"{index.d} dimensions; the manifest says {width}")
    _expect(index.ntotal == rows, path, f"{index.ntotal} rows; the manifest says {rows}")
    return index


def _thumbnail_offsets(layout: Layout, images: int) -> np.ndarray:
    """Where each image's JPEG starts in thumbnails.bin (and the last ends)."""
    path = layout.thumbnail_offsets
    with _reading(path):
        offsets = np.load(path)
    _expect(
        offsets.shape == (images + 1,) and offsets.dtype.kind in "iu",
        path,
        f"{offsets.dtype} values of shape {offsets.shape}; should be {images + 1} integers",
    )
    _expect(bool(offsets[0] == 0 and np.all(np.diff(offsets) >= 0)), path, "not increasing from 0")
    with _reading(layout.thumbnails):
        size = layout.thumbnails.stat().st_size
    _expect(
        int(offsets[-1]) == size,
        layout.thumbnails,
        f"{size} bytes; its offsets ({path.name}) end at {offsets[-1]}",
    )
    return offsets


class QueryEncoder:
    """Texts and images embedded by a trained run, as queries of its index. The model is
    called by one thread at a time (a server's requests arrive in several)."""

    def __init__(self, run: TrainedRun) -> None:
        self.run = run
        self.parts = Parts.of(run.model)
        self._lock = threading.Lock()

    def text(self, text: str) -> Query:
        with self._lock, torch.no_grad():
            parts = embed_texts(self.run.model, self.run.tokenizer, [text])
        return self._query(parts, "text")

    def image(self, image: Image.Image) -> Query:
        with self._lock, torch.no_grad():
            parts = embed_inputs(self.run.model, decoded_inputs(self.run.model, [image]))
        return self._query(parts, "image")

    def _query(self, parts: dict[str, torch.Tensor], side: str) -> Query:
        return Query(self.parts.row(parts, side)[0], self.fingerprint)

    @property
    def fingerprint(self) -> str:
        return self.run.fingerprint

    def weights(self, alpha: float | Mapping[str, float]) -> dict[str, float]:
        """The mixture weights of ``alpha``: the main pair's weight, the rest spread evenly
        over the frozen towers' pairs; or weights by part (``model.mixture``)."""
        names = self.parts.names
        if isinstance(alpha, Mapping) or len(names) <= 2:
            return self.run.model.mixture(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        rest = (1.0 - alpha) / (len(names) - 1)
        return {"f": float(alpha)} | {name: rest for name in names[1:]}
