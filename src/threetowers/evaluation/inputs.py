"""What ``embed_images`` feeds the model for a list of image files, made once where it can be.

Every run of a comparison is evaluated on the same benchmark images, and h is frozen: each
tower's view of an image and h's features of it are the same for every run (of a setting).
With ``data.preload`` the views are decoded once into ``data.cache_dir``
(:func:`~threetowers.data.caches.decoded.image_rows`); with ``data.cache`` h's features are
computed once there, keyed like training's feature cache by h's weights and preprocessing
and the files, and looked up instead of running h. The embeddings come out bit for bit the
same: pixels are the same uint8 either way, normalised per batch as training does, and h's
features are computed in the very batches the live path would run it on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.config import DataConfig
from threetowers.data.benchmarks import collate_images
from threetowers.data.caches.decoded import image_rows
from threetowers.data.caches.features import (
    backbone_digest,
    cache_base,
    files_digest,
    read_features,
    write_features,
)
from threetowers.data.pipeline import Normalise, PixelEvalTransform
from threetowers.data.sources.bad_samples import Skipped
from threetowers.model.three_towers import ThreeTowers


@dataclass(frozen=True)
class EvalCache:
    """Where evaluation keeps what every run would make again, and which of it."""

    directory: str
    pixels: bool  # each tower's decoded view (data.preload)
    features: bool  # h's features (data.cache)

    @classmethod
    def of(cls, data: DataConfig) -> EvalCache:
        return cls(data.cache_dir, data.preload, data.cache)


@dataclass(frozen=True)
class ImageInput:
    """One argument of ``model.image_embeddings``: rows ``(index, tensor)`` or
    ``(index, Skipped)`` of the files, and what turns a stacked batch into the argument."""

    rows: Dataset
    prepare: Callable[[torch.Tensor], torch.Tensor]


def image_inputs(
    model: ThreeTowers, paths: Sequence[Path], batch_size: int, cache: EvalCache | None
) -> dict[str, ImageInput]:
    """Every image input ``model`` needs for ``paths``, by argument name (``images``,
    ``frozen_features/NAME``, ``frozen_images/NAME``), each with a row per file (batches of
    ``batch_size`` rows line up across them)."""
    pixels_dir = cache.directory if cache is not None and cache.pixels else None

    def pixels(pre: Preprocessing) -> ImageInput:
        return ImageInput(image_rows(paths, PixelEvalTransform(pre), pixels_dir), Normalise(pre))

    inputs = {}
    if model.image_tower is not None:
        inputs["images"] = pixels(model.image_preprocessing)
    for name, tower in model.frozen.items():
        if cache is not None and cache.features:
            device = next(model.parameters()).device
            features = cached_frozen_features(
                tower,
                paths,
                batch_size,
                device,
                cache.directory,
                lambda t=tower: pixels(t.preprocessing),
            )
            inputs[f"frozen_features/{name}"] = ImageInput(features, _as_is)
        elif model.image_tower is not None:  # 3t: the tower's own view, as in training
            inputs[f"frozen_images/{name}"] = pixels(tower.preprocessing)
        else:  # lit: the locked tower's view is the model's image view
            inputs["images"] = pixels(tower.preprocessing)
    return inputs


def _as_is(features: torch.Tensor) -> torch.Tensor:
    return features


class FeatureRows(Dataset):
    """A frozen tower's cached features as rows: (index, features) or (index, Skipped)."""

    def __init__(self, paths: Sequence[Path], features: torch.Tensor, rows: torch.Tensor, bad):
        self.keys = [str(Path(path)) for path in paths]  # as ImageFiles names them
        self.features, self.bad = features, bad
        self.position = {int(row): position for position, row in enumerate(rows)}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | Skipped]:
        key = self.keys[index]
        if key in self.bad:
            return index, Skipped(key, *self.bad[key])
        return index, self.features[self.position[index]]


def cached_frozen_features(
    h: FrozenBackbone,
    paths: Sequence[Path],
    batch_size: int,
    device: torch.device,
    cache_dir: str,
    h_view: Callable[[], ImageInput],
) -> FeatureRows:
    """h's features of ``paths`` from the cache in ``cache_dir``; computed and saved first if
    missing, from ``h_view()``'s rows in batches of ``batch_size`` on ``device`` (h's last bits
    may depend on the batch it ran in and on the device, so both are part of the key)."""
    spec = {
        "backbone": backbone_digest(h),
        "files": files_digest(paths),
        "batch_size": batch_size,
        "device": device.type,
    }
    path = Path(f"{cache_base(cache_dir, f'{h.name}-eval', spec)}.safetensors")

    def parse(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> FeatureRows:
        return FeatureRows(paths, tensors["features"], tensors["rows"], json.loads(meta["bad"]))

    cached = read_features(path, parse)
    if cached is not None:
        return cached
    features, rows, bad = _compute(h, h_view(), batch_size, device)
    write_features(path, {"features": features, "rows": rows}, {"bad": json.dumps(bad)})
    return FeatureRows(paths, features, rows, bad)


@torch.no_grad()
def _compute(h: FrozenBackbone, view: ImageInput, batch_size: int, device: torch.device):
    """(features of the usable rows, their indices, {key: (reason, detail)} of the others)."""
    chunks, rows, bad = [], [], {}
    for indices, pixels, skipped in DataLoader(
        view.rows, batch_size=batch_size, collate_fn=collate_images
    ):
        bad |= {image.id: (image.reason, image.detail) for image in skipped}
        if len(indices):
            chunks.append(h(view.prepare(pixels).to(device)).float().cpu())
            rows.append(indices)
    if not chunks:  # no usable image: embed_images says so
        return torch.empty(0, h.feature_dim), torch.empty(0, dtype=torch.long), bad
    return torch.cat(chunks), torch.cat(rows), bad
