"""Embed image files and captions with a trained model, for search with an ordinary index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.eval_suite import embed_images, embed_texts
from threetowers.evaluate import mix
from threetowers.model import ThreeTowers

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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
    alpha: float = 1.0,
) -> tuple[torch.Tensor, list[str]]:
    """Embeddings of every image under ``images`` or every line of ``texts``, with their
    keys (relative paths or the lines). alpha < 1 gives 3T's convex-combination vectors."""
    if (images is None) == (texts is None):
        raise ValueError("give exactly one of --images DIR or --texts FILE")
    model._check_alpha(alpha)
    if images is not None:
        paths = image_files(images)
        parts = embed_images(model, paths)
        keys = [str(p.relative_to(images)) for p in paths]
        main, third = ("z_h", None) if model.mode == "lit" else ("z_f", "z_h")
    else:
        lines = [line.strip() for line in Path(texts).read_text(encoding="utf-8").splitlines()]
        keys = [line for line in lines if line]
        if not keys:
            raise ValueError(f"{texts} holds no captions (one per line)")
        parts = embed_texts(model, tokenizer, keys)
        main, third = "z_g", "z_gh"
    vectors = parts[main] if alpha == 1.0 else mix(parts[main], parts[third], alpha)
    return vectors, keys


def save_embeddings(path: str | Path, vectors: torch.Tensor, keys: list[str]) -> None:
    """``.safetensors`` (tensor "embeddings", keys in the metadata) or ``.npy`` + ``.keys.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, vectors.numpy())
        path.with_suffix(".keys.json").write_text(json.dumps(keys))
    elif path.suffix == ".safetensors":
        save_file(
            {"embeddings": vectors.contiguous()}, str(path), metadata={"keys": json.dumps(keys)}
        )
    else:
        raise ValueError(f"output {path} must end in .safetensors or .npy")
