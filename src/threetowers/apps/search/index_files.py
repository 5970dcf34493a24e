"""An index directory's files: where each lives (:class:`Layout`), their format's version,
and their writing (:func:`write_index`: everything but the manifest, which ``build.py``
writes last). An index directory holds

    manifest.json      the run's fingerprint, the parts and their widths (``part_dim``, the
                       main pair's, as ever; ``part_dims``, one per part, since a frozen
                       pair's part has its own), counts, dtype, the FAISS choice and the
                       recall it measured, the bad samples, each file's sha256; written last
                       (its presence means the index is complete)
    images.npy         one row per image: its parts' embeddings concatenated (parts.py),
                       float16 by default (the effect on recall@10 measured and recorded)
    images.faiss       the FAISS index over those rows (ann.py)
    images.parquet     row, id, location (file, or SHARD/KEY), source, first caption
    thumbnails.bin     each image as a small JPEG, back to back; thumbnails.npy its offsets
    captions.*         when the data has captions: their rows, index and table (caption,
                       image row), for image->text search

Every file is written whole or not at all; a full disk is one message naming the folder and
the space the files need (:func:`space_for`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from threetowers.apps.search import ann
from threetowers.apps.search.parts import Parts
from threetowers.errors import UserError
from threetowers.files.atomic import (
    publish,
    raise_if_disk_full,
    remove_temporaries,
    save_npy,
    temporary_path,
    write_atomic,
)
from threetowers.files.readback import file_sha256

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)
INDEX_VERSION = 1
SAMPLE_QUERIES = 256  # queries per weight setting for the measured recalls
DTYPES = ("float16", "float32")


class IndexMismatch(UserError, ValueError):
    """An index and a run (or a query, or a source) that do not belong together."""


class Layout:
    """The files of an index directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = root / "manifest.json"
        self.vectors, self.ann, self.table = (
            root / f"images.{suffix}" for suffix in ("npy", "faiss", "parquet")
        )
        self.caption_vectors, self.caption_ann, self.caption_table = (
            root / f"captions.{suffix}" for suffix in ("npy", "faiss", "parquet")
        )
        self.thumbnails = root / "thumbnails.bin"
        self.thumbnail_offsets = root / "thumbnails.npy"
        self.partial = root / "partial"
        self.plan = self.partial / "plan.json"  # written first: partial/ is ours to clear


@contextmanager
def space_for(folder: Path, what: str, needed: Callable[[], int]) -> Iterator[None]:
    """One message for a full disk while writing ``what`` (``needed()`` bytes) into
    ``folder``; the temporaries go, files already published are whole."""
    try:
        yield
    except Exception as error:
        remove_temporaries(folder)  # ours: the lock keeps other writers out
        raise_if_disk_full(error, folder, what, needed)
        raise


@dataclass
class Contents:
    """What an index holds, before it is written."""

    vectors: np.ndarray  # float32, one row per image: its parts concatenated
    ids: list[str]
    locations: list[str]
    captions: list[list[str]]  # each image's captions (may be none)
    caption_vectors: np.ndarray  # float32, one row per caption, in the images' order
    thumbnail_sizes: np.ndarray
    thumbnails: bytes


def write_index(
    layout: Layout,
    contents: Contents,
    parts: Parts,
    header: dict,
    dtype: str = "float16",
    kind: str | None = None,
    exact_below: int = ann.EXACT_BELOW,
) -> dict:
    """Write ``contents`` as an index (all but the manifest) and return its manifest:
    ``header`` (the run and source) with the counts, dtype and the FAISS indexes' records."""
    vectors, ids = contents.vectors, contents.ids
    stored = vectors.astype(dtype)
    searchable = stored.astype(np.float32)
    # Queries for the measured recalls: captions where there are some (text->image), else
    # the images themselves (image->image), at each sample weighting of the parts.
    probe = contents.caption_vectors if len(contents.caption_vectors) else vectors
    queries = _queries(probe, parts)
    k = min(ann.RECALL_K, len(ids))
    float16_recall = ann.recall(
        ann.exact_top(searchable, queries, k), ann.exact_top(vectors, queries, k)
    )
    index, record = ann.build_ann(
        searchable, queries, kind or ann.choose_kind(len(ids), exact_below)
    )
    log.info("%s: %s index, recall@10 %.3f", layout.root, record.kind, record.recall_at_10)
    first = [texts[0] if texts else None for texts in contents.captions]
    offsets = np.concatenate([[0], np.cumsum(contents.thumbnail_sizes)]).astype(np.int64)
    files = {
        layout.vectors: stored,
        layout.ann: index,
        layout.table: pa.table(
            {
                "row": list(range(len(ids))),
                "id": ids,
                "location": contents.locations,
                "caption": first,
            }
        ),
        layout.thumbnail_offsets: offsets,
        layout.thumbnails: contents.thumbnails,
    }
    manifest = header | {
        "version": INDEX_VERSION,
        "parts": list(parts.names),
        "part_dim": parts.dim,
        "part_dims": list(parts.dims),
        "images": len(ids),
        "captions": len(contents.caption_vectors),
        "dtype": dtype,
        "float16_recall_at_10": float16_recall if dtype == "float16" else None,
        "ann": record.to_json(),
    }
    if len(contents.caption_vectors):
        stored_captions = contents.caption_vectors.astype(dtype)
        caption_kind = kind or ann.choose_kind(len(stored_captions), exact_below)
        caption_index, caption_record = ann.build_ann(
            stored_captions.astype(np.float32), _queries(vectors, parts), caption_kind
        )
        texts = [caption for group in contents.captions for caption in group]
        owners = np.repeat(np.arange(len(ids)), [len(group) for group in contents.captions])
        files |= {
            layout.caption_vectors: stored_captions,
            layout.caption_ann: caption_index,
            layout.caption_table: pa.table({"caption": texts, "image_row": owners.tolist()}),
        }
        manifest["captions_ann"] = caption_record.to_json()
    layout.root.mkdir(parents=True, exist_ok=True)
    with space_for(layout.root, "the index files", lambda: sum(map(_size, files.values()))):
        for path, data in files.items():
            _write(path, data)
    # What serve checks before it answers: a file changed since is refused, not searched.
    manifest["sha256"] = {path.name: file_sha256(path) for path in files}
    return manifest


def _queries(rows: np.ndarray, parts: Parts) -> np.ndarray:
    """Up to SAMPLE_QUERIES of ``rows`` (a fixed draw) at each of ``parts``' sample weights."""
    picked = rows[np.sort(np.random.default_rng(0).permutation(len(rows))[:SAMPLE_QUERIES])]
    return np.concatenate([parts.weighted(picked, weights) for weights in parts.sample_weights()])


def _write(path: Path, data: np.ndarray | faiss.Index | pa.Table | bytes) -> None:
    if isinstance(data, np.ndarray):
        save_npy(path, data)
    elif isinstance(data, pa.Table):
        tmp = temporary_path(path)
        pq.write_table(data, tmp)
        publish(tmp, path)
    elif isinstance(data, bytes):
        write_atomic(path, data)
    else:
        ann.write_ann(data, path)


def _size(data: np.ndarray | faiss.Index | pa.Table | bytes) -> int:
    """About the bytes ``_write`` puts on disk for ``data`` (parquet: before compression)."""
    if isinstance(data, (np.ndarray, pa.Table)):
        return data.nbytes
    return len(data) if isinstance(data, bytes) else ann.serialized_size(data)
