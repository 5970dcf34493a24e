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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.config import DataConfig
from threetowers.data.caches.decoded import image_rows
from threetowers.data.caches.features import build_caches
from threetowers.data.caches.layout import CacheSpec
from threetowers.data.caches.streamed_features import StreamedFeatures
from threetowers.data.caches.units import FilesUnit
from threetowers.data.sources.bad_samples import Skipped
from threetowers.data.transforms import PixelEvalTransform
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
        rows = image_rows(paths, PixelEvalTransform(pre), pixels_dir)
        return ImageInput(rows, pre.normalize_pixels)

    def features(name: str, tower: FrozenBackbone) -> ImageInput:
        device = next(model.parameters()).device
        rows = cached_frozen_features(name, tower, paths, batch_size, device, cache.directory)
        return ImageInput(rows, _as_is)

    cached = cache is not None and cache.features
    return _model_inputs(model, pixels, features if cached else None)


def decoded_inputs(model: ThreeTowers, images: Sequence[Image.Image]) -> dict[str, ImageInput]:
    """:func:`image_inputs` for images already decoded (RGB), the same views of them."""

    def pixels(pre: Preprocessing) -> ImageInput:
        view = PixelEvalTransform(pre)
        rows = [(i, view(image)) for i, image in enumerate(images)]
        return ImageInput(rows, pre.normalize_pixels)

    return _model_inputs(model, pixels, None)


def _model_inputs(
    model: ThreeTowers,
    pixels: Callable[[Preprocessing], ImageInput],
    features: Callable[[str, FrozenBackbone], ImageInput] | None,
) -> dict[str, ImageInput]:
    """Which inputs ``model`` reads: f's view, and each frozen image tower's features
    (``features``, when they are cached) or its own view."""
    inputs = {}
    if model.image_tower is not None:
        inputs["images"] = pixels(model.image_preprocessing)
    for name in model.structure.image_towers:  # text towers read the captions
        tower = model.frozen[name]
        if features is not None:
            inputs[f"frozen_features/{name}"] = features(name, tower)
        elif model.image_tower is not None:  # 3t: the tower's own view, as in training
            inputs[f"frozen_images/{name}"] = pixels(tower.preprocessing)
        else:  # lit: the locked tower's view is the model's image view
            inputs["images"] = pixels(tower.preprocessing)
    return inputs


def _as_is(features: torch.Tensor) -> torch.Tensor:
    return features


class FeatureRows(Dataset):
    """A frozen tower's cached features of the files as rows: (index, features) or
    (index, Skipped)."""

    def __init__(self, paths: Sequence[Path], features: StreamedFeatures) -> None:
        self.keys = [str(Path(path)) for path in paths]  # as ImageFiles names them
        self.features = features

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | Skipped]:
        return index, self.features.lookup(index, self.keys[index])


def cached_frozen_features(
    name: str,
    tower: FrozenBackbone,
    paths: Sequence[Path],
    batch_size: int,
    device: torch.device,
    cache_dir: str,
) -> FeatureRows:
    """A frozen tower's features of ``paths`` from its cache in ``cache_dir``, computed and
    saved first if missing, in batches of ``batch_size`` on ``device`` (h's last bits may
    depend on the batch it ran in and on the device, so both are part of the key), float32."""
    unit = FilesUnit(tuple(str(Path(path)) for path in paths))
    context = {"batch_size": batch_size, "device": device.type}
    spec = CacheSpec(cache_dir, "float32", context, kind="-eval")
    features = build_caches({name: tower}, [unit], spec, batch_size, progress=False)
    return FeatureRows(paths, features[name])
