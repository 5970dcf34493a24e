"""Embed image files and captions with a trained model, for search with an ordinary index.

Unreadable images and unusable caption lines (not UTF-8, absurdly long) are skipped,
counted and named in the log; more than ``max_bad_fraction`` of them is an error.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from threetowers.data.sources.bad_samples import BadDataError, BadSample, BadSampleLog
from threetowers.data.sources.decode import caption_text, clean_captions
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.errors import UserError
from threetowers.evaluation.embedding import embed_images, embed_texts
from threetowers.files.atomic import save_tensors, write_atomic
from threetowers.model.combination import mix
from threetowers.model.objective import Z_F, Z_G
from threetowers.model.three_towers import ThreeTowers

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class EmbedError(UserError, ValueError):
    """What was asked of ``embed`` cannot be done: --images/--texts, --alpha, --out, or a
    caption file with no line in it."""


def image_files(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory {root} not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


def embed(
    model: ThreeTowers,
    tokenizer: CaptionTokenizer,
    images: str | Path | None = None,
    texts: str | Path | None = None,
    alpha: float | Mapping[str, float] = 1.0,
    max_bad_fraction: float = 1.0,
) -> tuple[torch.Tensor, list[str]]:
    """Embeddings of every usable image under ``images`` or every usable line of ``texts``,
    with their keys (relative paths or the lines). ``alpha`` < 1, or weights by part (``f``,
    frozen tower names and frozen pair names: a pair's part is its own score, in its own
    width), gives 3T's convex-combination vectors (``model.mixture``)."""
    if (images is None) == (texts is None):
        raise EmbedError("give exactly one of --images DIR or --texts FILE")
    weights = model.mixture(alpha)
    others = model.structure.parts  # the parts besides the main pair
    if images is not None:
        paths = image_files(images)
        bad = BadSampleLog(max_bad_fraction, f"images under {images}", size=len(paths))
        parts = embed_images(model, paths, bad_images=bad)
        keys = [str(paths[i].relative_to(images)) for i in parts["index"].tolist()]
        main, mixed = model.image_key, [Z_F, *(model.structure.pair(p)[0] for p in others)]
    else:
        keys, bad = caption_lines(texts, max_bad_fraction)
        parts = embed_texts(model, tokenizer, keys)
        main = model.structure.text_key
        mixed = [Z_G, *(model.structure.pair(p)[1] for p in others)]
    bad.check()
    if bad.total:
        log.warning(bad.summary())
    if weights == {"f": 1.0}:
        return parts[main], keys
    order = ("f", *others)
    vectors = mix([parts[key] for key in mixed], [weights.get(part, 0.0) for part in order])
    return vectors, keys


def parse_alpha(text: str) -> float | dict[str, float]:
    """``--alpha``: one number (the main pair's weight, one frozen tower), or weights by part,
    ``f=0.5,inet=0.3,scene=0.2``."""
    try:
        if "=" not in text:
            return float(text)
        pairs = [item.split("=", 1) for item in text.split(",")]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise EmbedError(
            f"--alpha {text!r}: give a number in [0, 1] or weights by part summing to 1, "
            "e.g. --alpha 0.7 or --alpha f=0.5,inet=0.3,scene=0.2"
        ) from None


def caption_lines(texts: str | Path, max_bad_fraction: float) -> tuple[list[str], BadSampleLog]:
    """The usable lines of a caption file (blank lines separate, they are not captions)."""
    path = Path(texts)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} not found (--texts: one caption per line)")
    lines = [
        (number, line)
        for number, line in enumerate(path.read_bytes().splitlines(), start=1)
        if line.strip()
    ]
    if not lines:
        raise EmbedError(f"{path} holds no captions (one per line)")
    bad = BadSampleLog(max_bad_fraction, f"captions of {path}", size=len(lines))
    keys = []
    for number, line in lines:
        try:
            keys += clean_captions([caption_text(line, f"{path}:{number}")], f"{path}:{number}")
        except BadSample as error:
            bad.record(0, [error.skipped(f"line {number}")])
    bad.record(len(keys), [])
    if not keys:
        raise BadDataError(f"{bad.summary()}: no caption to embed")
    return keys, bad


def save_embeddings(path: str | Path, vectors: torch.Tensor, keys: list[str]) -> None:
    """``.safetensors`` (tensor "embeddings", keys in the metadata) or ``.npy`` + ``.keys.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":  # the keys first: vectors are never read without their keys
        write_atomic(path.with_suffix(".keys.json"), json.dumps(keys))
        buffer = io.BytesIO()
        np.save(buffer, vectors.numpy())
        write_atomic(path, buffer.getvalue())
    elif path.suffix == ".safetensors":
        save_tensors(path, {"embeddings": vectors}, {"keys": json.dumps(keys)})
    else:
        raise EmbedError(f"output {path} must end in .safetensors or .npy")
