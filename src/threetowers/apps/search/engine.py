"""Search an index: queries embedded by the run that built it, weighted at query time.

:class:`SearchIndex` reads an index directory (build.py) and answers ``search(query,
weights, k)``; :class:`QueryEncoder` embeds a text or an image with the run. A query carries
its run's fingerprint, and an index refuses a query embedded by another run: the vectors
would be in another space and the results meaningless.

An index is checked when it is opened (checks.py), so that a damaged one is refused with one
message instead of answering every query with an error or a wrong result.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from threetowers.apps.search import ann
from threetowers.apps.search.checks import (
    check_vectors,
    expect,
    part_dims,
    read_ann,
    read_manifest,
    read_table,
    reading,
    thumbnail_offsets,
)
from threetowers.apps.search.index_files import IndexMismatch, Layout
from threetowers.apps.search.parts import Parts, weighted
from threetowers.evaluation.embedding import embed_inputs, embed_texts
from threetowers.evaluation.inputs import decoded_inputs
from threetowers.model.trained import TrainedRun

TARGETS = ("images", "captions")


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
        self.manifest = manifest = read_manifest(layout)  # checksums too, before any parsing
        self.part_dims = part_dims(manifest)
        width = sum(self.part_dims)
        check_vectors(layout.vectors, manifest["images"], width, manifest["dtype"])
        table = read_table(layout.table, ["id", "caption"], manifest["images"], "images")
        self.ids: list[str] = table["id"]
        self.first_captions: list[str | None] = table["caption"]
        self.row_of = {image_id: row for row, image_id in enumerate(self.ids)}
        self.index = read_ann(layout.ann, manifest["images"], width, manifest["ann"]["kind"])
        self.record = ann.AnnRecord(**manifest["ann"])
        self.captions: list[str] = []
        if manifest["captions"]:
            count = manifest["captions"]
            check_vectors(layout.caption_vectors, count, width, manifest["dtype"])
            captions = read_table(layout.caption_table, ["caption", "image_row"], count, "captions")
            self.captions, self.caption_owners = captions["caption"], captions["image_row"]
            owners = np.asarray(self.caption_owners)
            expect(
                owners.dtype.kind in "iu" and 0 <= owners.min() and owners.max() < len(self),
                layout.caption_table,
                f"image_row should hold rows 0..{len(self) - 1}",
            )
            kind = manifest["captions_ann"]["kind"]
            self.caption_index = read_ann(layout.caption_ann, count, width, kind)
            self.caption_record = ann.AnnRecord(**manifest["captions_ann"])
        self.offsets = thumbnail_offsets(layout, manifest["images"])
        with reading(layout.thumbnails):
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
        vector = weighted(query.vector[None], self.manifest["parts"], self.part_dims, weights)
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
