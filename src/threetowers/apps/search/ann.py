"""The FAISS index over an index's vectors, exact for small sets and approximate above.

Below ``exact_below`` vectors the index is exact inner product (``IndexFlatIP``); above it,
IVF, with its search parameter (``nprobe``) set to the smallest value whose recall@10
against exact search reaches ``recall_target`` on sample queries. HNSW is there to be
chosen (``kind="hnsw"``, tuned the same way on ``efSearch``), not by default: on 200k
embedding-shaped vectors at recall@10 >= 0.95 it built in 29 s against IVF's 8.6 s and
answered in 5.5 ms against 1.8 ms (benchmarks/search.py). The choice, its parameters and
the recall they measured go into the manifest.
"""

from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from threetowers.files.atomic import fsync, publish, temporary_path

EXACT_BELOW = 50_000
RECALL_TARGET = 0.95
RECALL_K = 10
HNSW_NEIGHBOURS = 32  # M: links per node; 32 is FAISS's usual choice for ~100-1000 dims
HNSW_BUILD_DEPTH = 64  # efConstruction
KINDS = ("exact", "hnsw", "ivf")


@dataclass
class AnnRecord:
    """What the manifest says of the index: its kind, parameters and measured recall."""

    kind: str
    params: dict = field(default_factory=dict)
    recall_at_10: float = 1.0  # against exact search, on the sample queries
    sample_queries: int = 0
    build_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def choose_kind(count: int, exact_below: int = EXACT_BELOW) -> str:
    return "exact" if count < exact_below else "ivf"


def build_ann(
    vectors: np.ndarray,
    queries: np.ndarray,
    kind: str,
    recall_target: float = RECALL_TARGET,
) -> tuple[faiss.Index, AnnRecord]:
    """An index of ``kind`` over ``vectors`` (float32 rows), its search parameter tuned with
    ``queries`` (float32 rows, weighted as a search would weight them)."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    start = time.perf_counter()
    dim = vectors.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_BUILD_DEPTH
    else:
        lists = max(1, min(len(vectors) // 39, round(4 * math.sqrt(len(vectors)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(len(vectors))[: 64 * lists]
        index.train(vectors[np.sort(sample)])
    index.add(vectors)
    record = AnnRecord(kind, build_seconds=time.perf_counter() - start)
    if kind != "exact":
        _tune(index, record, vectors, queries, recall_target)
    return index, record


def _tune(
    index: faiss.Index,
    record: AnnRecord,
    vectors: np.ndarray,
    queries: np.ndarray,
    target: float,
) -> None:
    """The smallest search parameter reaching ``target`` recall@10 (or the largest tried)."""
    k = min(RECALL_K, len(vectors))
    truth = exact_top(vectors, queries, k)
    name = "efSearch" if record.kind == "hnsw" else "nprobe"
    limit = 4096 if record.kind == "hnsw" else index.nlist
    value = 16 if record.kind == "hnsw" else 1
    while True:
        record.params = {name: value}
        _, found = ann_search(index, record, queries, k)
        record.recall_at_10 = recall(found, truth)
        if record.recall_at_10 >= target or value >= limit:
            break
        value = min(2 * value, limit)
    record.sample_queries = len(queries)


def ann_search(
    index: faiss.Index, record: AnnRecord, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the ``k`` best rows per query; rows are -1 where fewer exist."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if record.kind == "hnsw":
        depth = max(record.params["efSearch"], k)
        return index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=depth))
    if record.kind == "ivf":
        return index.search(
            queries, k, params=faiss.SearchParametersIVF(nprobe=record.params["nprobe"])
        )
    return index.search(queries, k)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best rows of ``vectors`` per query by inner product (the ground truth)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """The mean fraction of each query's true top-k that ``found`` holds."""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def write_ann(index: faiss.Index, path: Path) -> None:
    """``index`` in ``path``, whole or not at all. FAISS reports a failed write (a full disk
    among them) as a RuntimeError: it comes out as the OSError Python would raise."""
    tmp = temporary_path(path)
    try:
        faiss.write_index(index, str(tmp))
    except RuntimeError as error:
        tmp.unlink(missing_ok=True)
        raise _os_error(str(error), path) from None
    fsync(tmp)
    publish(tmp, path)


def serialized_size(index: faiss.Index) -> int:
    """The bytes ``write_ann`` writes for ``index`` (counted, not stored)."""
    size = 0

    def count(data: bytes) -> int:
        nonlocal size
        size += len(data)
        return len(data)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return size


def _os_error(message: str, path: Path) -> OSError:
    """FAISS's message ("... write error in F: 4051 != 512000 (No space left on device)") as
    an OSError with the errno whose text it names."""
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.ENOENT, errno.EROFS, errno.EIO):
        if os.strerror(code) in message:
            return OSError(code, os.strerror(code), str(path))
    return OSError(f"could not write {path}: {message}")


def read_ann(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))
