"""``threetowers index``: a trained run's embeddings of a set of images, ready to search.

The index's files and their writing: ``index_files.py``. Images are embedded in chunks of
``chunk_size`` written to ``partial/`` as they finish, so an interrupted build resumes at its
last chunk. Bad images are skipped, counted and named, as everywhere else; an id met twice is
skipped the second time, so a result names one image. One build at a time writes a
directory (a second is refused: ``locks.exclusive``). A full disk stops the build with one
message naming the folder and the space the files need, and the same command run again
finishes it.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from threetowers.apps.search import ann
from threetowers.apps.search.index_files import (
    DTYPES,
    INDEX_VERSION,
    Contents,
    IndexMismatch,
    Layout,
    space_for,
    write_index,
)
from threetowers.apps.search.items import IndexSource, Item
from threetowers.apps.search.parts import Parts
from threetowers.data.sources.bad_samples import BadDataError, BadSample, BadSampleLog, Skipped
from threetowers.errors import UserError
from threetowers.evaluation.embedding import embed_inputs, embed_texts
from threetowers.evaluation.inputs import decoded_inputs
from threetowers.files.atomic import (
    publish,
    refuse_foreign,
    remove_temporaries,
    temporary_path,
    write_atomic,
)
from threetowers.files.locks import exclusive
from threetowers.files.readback import read_json
from threetowers.model.trained import TrainedRun

log = logging.getLogger(__name__)
CHUNK = 2048
THUMBNAIL_SIDE = 256  # the longest side of a stored thumbnail, in pixels


def build_index(
    run: TrainedRun,
    source: IndexSource,
    out: str | Path,
    dtype: str = "float16",
    kind: str | None = None,
    exact_below: int = ann.EXACT_BELOW,
    chunk_size: int = CHUNK,
    batch_size: int = 256,
    max_bad_fraction: float | None = None,
    progress: bool = True,
) -> dict:
    """Build (or resume, or find complete) the index of ``source`` in ``out``; its manifest.
    ``kind`` forces the FAISS index (``exact``, ``hnsw``, ``ivf``); by default it follows the
    size (``exact_below``). More bad images than ``max_bad_fraction`` (default: the run's
    ``data.max_bad_fraction``) stop the build."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    layout = Layout(Path(out))
    refuse_foreign(layout.root, [layout.manifest, layout.plan], "index", "--out")
    with exclusive(layout.root, "index", "wait for it to finish or pass another --out"):
        plan = {
            "version": INDEX_VERSION,
            "fingerprint": run.fingerprint,
            "source": source.description,
            "size": source.size,
            "chunk_size": chunk_size,
        }
        if layout.manifest.is_file():
            manifest = read_json(layout.manifest)
            if all(manifest.get(key) == plan[key] for key in ("fingerprint", "source", "version")):
                log.info(
                    "%s is complete (%d images); nothing to do", layout.root, manifest["images"]
                )
                return manifest
            raise IndexMismatch(
                f"{layout.root} holds an index of another run or source ({manifest.get('run')}, "
                f"{manifest.get('source')}); delete it or pass another --out"
            )
        if max_bad_fraction is None:
            max_bad_fraction = run.cfg.data.max_bad_fraction
        bad = BadSampleLog(max_bad_fraction, source.description, size=source.size)
        chunks = _embed_chunks(run, source, layout, plan, bad, batch_size, progress)
        parts = Parts.of(run.model)
        header = {
            "fingerprint": run.fingerprint,
            "run": str(run.run_dir.resolve()),
            "step": run.step,
            "mode": run.model.mode,
            "source": source.description,
        }
        contents = _contents(chunks, parts.width)
        manifest = write_index(layout, contents, parts, header, dtype, kind, exact_below)
        manifest["bad_samples"] = bad.metrics()
        manifest["skipped_examples"] = [[s.id, s.reason, s.detail] for s in bad.examples]
        text = json.dumps(manifest, indent=1)
        with space_for(layout.root, "manifest.json", lambda: len(text)):
            write_atomic(layout.manifest, text)  # last: the index is complete
        _clear_partial(layout)
        return manifest


def _embed_chunks(
    run: TrainedRun,
    source: IndexSource,
    layout: Layout,
    plan: dict,
    bad: BadSampleLog,
    batch_size: int,
    progress: bool,
) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """Every chunk's record and arrays, embedding those that ``partial/`` does not hold yet;
    the bad samples of all of them go to ``bad``."""
    partial, plan_file = layout.partial, layout.plan
    if plan_file.is_file() and read_json(plan_file) != plan:
        log.info("%s: partial work of another build; starting over", layout.root)
        _clear_partial(layout)
    partial.mkdir(parents=True, exist_ok=True)
    write_atomic(plan_file, json.dumps(plan))
    parts = Parts.of(run.model)
    seen: set[str] = set()
    chunks = []
    bar = tqdm(total=source.size, desc="index", unit="img", disable=not progress)
    items = iter(source.items())
    for number in range(-(-source.size // plan["chunk_size"])):
        batch = list(itertools.islice(items, plan["chunk_size"]))
        record_file = partial / f"chunk_{number:06d}.json"
        arrays_file = partial / f"chunk_{number:06d}.npz"
        if record_file.is_file():
            record = read_json(record_file)
            arrays = dict(np.load(arrays_file))
            bad.record(len(record["ids"]), [Skipped(*s) for s in record["skipped"]])
            seen.update(record["ids"])
        else:
            record, arrays = _embed_chunk(run, parts, batch, seen, batch_size)
            bad.record(len(record["ids"]), [Skipped(*s) for s in record["skipped"]])
            _save_chunk(record_file, arrays_file, record, arrays)
        chunks.append((record, arrays))
        bar.update(len(batch))
    bar.close()
    bad.check()
    if bad.total:
        log.warning(bad.summary())
    if not any(record["ids"] for record, _ in chunks):
        raise BadDataError(f"{bad.summary()}: no image to index")
    return chunks


def _save_chunk(record_file: Path, arrays_file: Path, record: dict, arrays: dict) -> None:
    what = f"the embeddings of {arrays_file.stem}"
    needed = sum(array.nbytes for array in arrays.values())
    with space_for(arrays_file.parent, what, lambda: needed):
        tmp = temporary_path(arrays_file)
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        publish(tmp, arrays_file)
        write_atomic(record_file, json.dumps(record))  # last: the chunk is complete


def _clear_partial(layout: Layout) -> None:
    """Remove what ``_embed_chunks`` wrote in partial/ (and partial/ once empty), nothing else."""
    for pattern in ("chunk_*.json", "chunk_*.npz"):
        for path in layout.partial.glob(pattern):
            path.unlink()
    layout.plan.unlink(missing_ok=True)
    remove_temporaries(layout.partial)
    if not any(layout.partial.iterdir()):
        layout.partial.rmdir()


def _embed_chunk(
    run: TrainedRun, parts: Parts, batch: list[Item], seen: set[str], batch_size: int
) -> tuple[dict, dict[str, np.ndarray]]:
    images, record = [], {"ids": [], "locations": [], "captions": [], "skipped": []}
    for item in batch:
        try:
            if item.id in seen:
                raise BadSample("malformed_row", f"{item.location}: the id {item.id!r} again")
            image, captions = item.load()
        except BadSample as error:
            record["skipped"].append([item.id, error.reason, error.detail])
            continue
        seen.add(item.id)
        images.append(image)
        record["ids"].append(item.id)
        record["locations"].append(item.location)
        record["captions"].append(captions)
    arrays = {"thumbnail_sizes": np.zeros(0, np.int64), "thumbnails": np.zeros(0, np.uint8)}
    if not images:
        return record, arrays
    embedded = embed_inputs(run.model, decoded_inputs(run.model, images), batch_size)
    arrays["images"] = parts.row(embedded, "image")
    captions = [caption for texts in record["captions"] for caption in texts]
    if captions:
        texts = embed_texts(run.model, run.tokenizer, captions, batch_size)
        arrays["captions"] = parts.row(texts, "text")
    thumbnails = [thumbnail(image) for image in images]
    arrays["thumbnail_sizes"] = np.array([len(t) for t in thumbnails], np.int64)
    arrays["thumbnails"] = np.frombuffer(b"".join(thumbnails), np.uint8)
    return record, arrays


def thumbnail(image: Image.Image) -> bytes:
    """A JPEG of at most THUMBNAIL_SIDE pixels a side (smaller images keep their size)."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _contents(chunks: list[tuple[dict, dict[str, np.ndarray]]], width: int) -> Contents:
    records = [record for record, _ in chunks]
    return Contents(
        vectors=_stack([a["images"] for _, a in chunks if "images" in a], width),
        ids=[i for record in records for i in record["ids"]],
        locations=[loc for record in records for loc in record["locations"]],
        captions=[texts for record in records for texts in record["captions"]],
        caption_vectors=_stack([a["captions"] for _, a in chunks if "captions" in a], width),
        thumbnail_sizes=np.concatenate([a["thumbnail_sizes"] for _, a in chunks]),
        thumbnails=b"".join(a["thumbnails"].tobytes() for _, a in chunks),
    )


def _stack(arrays: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0, width), np.float32)
