"""Hugging Face ``transformers`` vision models as a frozen third tower.

``load_hf_backbone(path)`` loads a local ``save_pretrained`` directory (no network) and wraps it
in a :class:`FrozenBackbone` returning pooled (B, C) features. ``transformers`` is imported
lazily, so this module imports without the ``[hf]`` extra.

* Classification checkpoints (``*ForImageClassification``) load as their base encoder; the
  classifier is dropped. Weights missing from the checkpoint are never used silently.
* CLIP / SigLIP checkpoints (full two-tower or vision-only saves) load their vision tower.
* Pooling follows ``AUTO_POOL`` (by ``config.model_type``) unless forced.
* Preprocessing comes from ``preprocessor_config.json`` read as plain JSON (the image
  processor classes are not used: their fast variants need torchvision).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from threetowers.backbones.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenBackbone, Preprocessing
from threetowers.backbones.registry import FROZEN_POOLS
from threetowers.errors import UserError, require
from threetowers.files.safe_load import refusal

POOL_MODES = FROZEN_POOLS

# pool="auto" by model_type. Unknown types use "pooler" when the model returns a
# pooler_output and "mean" over tokens / spatial positions otherwise.
AUTO_POOL: dict[str, str] = {
    # ViT-style encoders: last_hidden_state is already final-layernormed and the CLS token is
    # what their classifiers read. ViT/DeiT poolers (dense+tanh) are not in classification
    # checkpoints, so they are not built at all.
    "vit": "cls",
    "deit": "cls",
    "vit_msn": "cls",
    "dinov2": "cls",
    "dinov2_with_registers": "cls",
    # BEiT / data2vec-vision: the classifier reads the pooler (mean of patch tokens + layernorm
    # with use_mean_pooling); last_hidden_state then has no final norm, so CLS would be wrong.
    "beit": "pooler",
    "data2vec-vision": "pooler",
    # CNNs and hierarchical transformers: the pooler is global average pooling (+ layernorm
    # for ConvNeXt / Swin), exactly the feature their classifiers read.
    "resnet": "pooler",
    "regnet": "pooler",
    "efficientnet": "pooler",
    "convnext": "pooler",
    "convnextv2": "pooler",
    "swin": "pooler",
    "swinv2": "pooler",
    # CLIP: post-layernorm CLS (the input of visual_projection). SigLIP: the MAP attention head.
    # Full two-tower saves ("clip", "siglip") load the same vision tower.
    "clip": "pooler",
    "clip_vision_model": "pooler",
    "siglip": "pooler",
    "siglip_vision_model": "pooler",
}

# Two-tower checkpoints: load only the vision tower. The vision classes also read a full
# two-tower save (they take the vision_config and ignore the text weights).
VISION_TOWER_CLASSES: dict[str, str] = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}

# Vision models whose forward is not a deterministic feature extractor.
UNSUPPORTED: dict[str, str] = {
    "vit_mae": "ViTMAEModel randomly masks patches in every forward, so features are not "
    "deterministic; use a ViT checkpoint fine-tuned from it",
}

# PIL resample codes used by Hugging Face image processors.
PIL_RESAMPLE: dict[int, str] = {0: "nearest", 2: "bilinear", 3: "bicubic"}

PREPROCESSOR_FILE = "preprocessor_config.json"


class HFTowerError(UserError, ValueError):
    """A Hugging Face model folder (or the pool mode asked of it) that cannot serve as a
    frozen tower."""


class HFVisionFeatures(nn.Module):
    """Normalised ``pixel_values`` (B, 3, S, S) -> pooled (B, C) features of an HF model."""

    def __init__(self, model: nn.Module, pool: str, name: str) -> None:
        super().__init__()
        self.model = model
        self.pool = pool
        self.name = name

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Follow the model's dtype so a user may .half() the tower; features leave as float32.
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(pixel_values=pixel_values.to(dtype), return_dict=True)
        return pool_outputs(outputs, self.pool, self.name).float()


def pool_outputs(outputs: Any, pool: str, name: str = "hf") -> torch.Tensor:
    """Reduce a transformers model output to (B, C) with an explicit ``pool`` mode."""
    hidden = getattr(outputs, "last_hidden_state", None)
    pooled = getattr(outputs, "pooler_output", None)
    if pool == "pooler":
        if pooled is None:
            raise HFTowerError(
                f"HF tower {name!r} returns no pooler_output; load it with pool='cls' or 'mean'"
            )
        # CNN poolers return (B, C, 1, 1).
        return pooled.flatten(1)
    if hidden is None:
        raise HFTowerError(f"HF tower {name!r} returns no last_hidden_state to pool with {pool!r}")
    if pool == "cls":
        if hidden.ndim != 3:
            raise HFTowerError(
                f"HF tower {name!r}: pool='cls' needs token outputs (B, N, C), got "
                f"last_hidden_state of shape {tuple(hidden.shape)} (a CNN feature map?); "
                "use pool='pooler' or 'mean'"
            )
        return hidden[:, 0]
    if pool == "mean":
        if hidden.ndim == 3:  # tokens (B, N, C); includes CLS / register tokens
            return hidden.mean(dim=1)
        if hidden.ndim == 4:  # feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        raise HFTowerError(
            f"HF tower {name!r}: cannot mean-pool last_hidden_state of shape "
            f"{tuple(hidden.shape)}; expected (B, N, C) or (B, C, H, W)"
        )
    raise ValueError(f"pool must be one of {POOL_MODES[1:]} here, got {pool!r}")


def load_hf_backbone(path: str | os.PathLike, pool: str = "auto") -> FrozenBackbone:
    """Load a local Hugging Face vision model directory as a frozen tower.

    ``pool``: ``"auto"`` (see ``AUTO_POOL``), ``"cls"`` (``last_hidden_state[:, 0]``),
    ``"pooler"`` (``pooler_output`` flattened) or ``"mean"`` (over tokens / positions).
    """
    if pool not in POOL_MODES:
        raise HFTowerError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    transformers = require("transformers", "a transformers vision tower (backbone hf)")

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Hugging Face model directory {str(directory)!r} does not exist; pass the folder "
            "written by model.save_pretrained(...) (it holds config.json and the weights)"
        )
    raw_config = _read_json(directory / "config.json", what="model config")
    model_type = raw_config.get("model_type")
    if not model_type:
        raise HFTowerError(f"{directory / 'config.json'} has no 'model_type'; is it an HF config?")
    if model_type in UNSUPPORTED:
        raise HFTowerError(f"unsupported model in {directory}: {UNSUPPORTED[model_type]}")

    loader, base_class = _model_classes(transformers, directory, model_type)
    # Resolve the pool mode we can know before loading, to avoid building a pooler we would
    # not use: ViT/DeiT poolers are absent from classification checkpoints and would be
    # randomly initialised.
    planned_pool = AUTO_POOL.get(model_type, "auto") if pool == "auto" else pool
    kwargs: dict[str, Any] = {}
    if planned_pool in ("cls", "mean") and "add_pooling_layer" in _params(base_class.__init__):
        kwargs["add_pooling_layer"] = False

    # transformers logs a load report listing every text weight of a CLIP save and the
    # classifier of a classification save; we check the loading info ourselves instead.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = loader.from_pretrained(
            directory,
            local_files_only=True,
            output_loading_info=True,
            weights_only=True,  # transformers' default: said here because it must stay so
            trust_remote_code=False,
            **kwargs,
        )
    except pickle.UnpicklingError as err:
        raise refusal(directory, err) from None
    except (OSError, ValueError) as err:
        raise HFTowerError(f"could not load the Hugging Face model in {directory}: {err}") from err
    finally:
        transformers.logging.set_verbosity(verbosity)

    missing = sorted(info.get("missing_keys", ()))
    pooler_missing = bool(missing) and all("pooler" in key.split(".") for key in missing)
    if missing and not pooler_missing:
        raise HFTowerError(
            f"the checkpoint in {directory} lacks weights for {type(model).__name__} (they would "
            f"be randomly initialised): {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            "save the model with save_pretrained from the matching architecture"
        )
    if pooler_missing:
        if planned_pool == "pooler":
            raise HFTowerError(
                f"the pooler of {type(model).__name__} is not in the checkpoint in {directory} "
                f"(it would be randomly initialised): {missing}; use pool='cls' or 'mean'"
            )
        planned_pool = "mean" if planned_pool == "auto" else planned_pool

    # Keep float32 whatever the checkpoint dtype: the probe and callers feed float32 images.
    model = model.float().eval()
    for param in model.parameters():
        param.requires_grad_(False)

    preprocessing = load_preprocessing(directory, _config_image_size(model.config))
    name = f"hf:{directory.name}"
    features = HFVisionFeatures(model, planned_pool, name)
    feature_dim = _probe(features, preprocessing, directory)
    return FrozenBackbone(features, preprocessing, feature_dim=feature_dim, name=name)


def load_preprocessing(
    directory: str | os.PathLike, fallback_size: int | None = None
) -> Preprocessing:
    """Read ``preprocessor_config.json`` of an HF model directory into a :class:`Preprocessing`.

    Without the file: ``fallback_size`` (or 224) with ImageNet statistics, and a warning.
    """
    file = Path(directory) / PREPROCESSOR_FILE
    if not file.is_file():
        size = fallback_size or 224
        warnings.warn(
            f"{file} not found: assuming {size}px images, ImageNet mean/std, bicubic resize "
            "and a 0.875 centre crop, which may not match how the model was trained; add the "
            f"model's "
            f"{PREPROCESSOR_FILE} (image_processor.save_pretrained(...) into that folder)",
            stacklevel=2,
        )
        return Preprocessing(image_size=size)
    cfg = _read_json(file, what="image preprocessor config")

    if cfg.get("do_normalize", True):
        mean = _triple(cfg.get("image_mean", IMAGENET_MEAN), "image_mean", file)
        std = _triple(cfg.get("image_std", IMAGENET_STD), "image_std", file)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resize = _resample(cfg.get("resample", 3), file)

    # Side length after resizing: (height, width) when resized exactly, else (shortest edge,)
    size = cfg.get("size", fallback_size or 224)
    if isinstance(size, int):
        resized = (size, size)
    elif isinstance(size, dict) and "height" in size and "width" in size:
        resized = (int(size["height"]), int(size["width"]))
    elif isinstance(size, dict) and "shortest_edge" in size:
        resized = (int(size["shortest_edge"]),)
    else:
        raise HFTowerError(f"{file}: cannot read 'size' = {size!r}")

    processor_type = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type", ""))
    if processor_type.startswith("ConvNext") and "crop_pct" in cfg:
        # ConvNextImageProcessor (also used by ResNet): below 384px it resizes the short side to
        # size / crop_pct and centre-crops `size`; from 384px it warps to size x size.
        edge = resized[0]
        crop_fraction = float(cfg["crop_pct"]) if edge < 384 else 1.0
        return Preprocessing(edge, mean, std, resize, crop_fraction)

    if cfg.get("do_center_crop") and cfg.get("crop_size") is not None:
        crop = cfg["crop_size"]
        if isinstance(crop, dict):
            if crop.get("height") != crop.get("width"):
                raise HFTowerError(f"{file}: only square crops are supported, got {crop}")
            crop = crop["height"]
        crop = int(crop)
        return Preprocessing(crop, mean, std, resize, min(1.0, crop / min(resized)))

    if len(resized) == 2 and resized[0] != resized[1]:
        raise HFTowerError(f"{file}: only square inputs are supported, got size {size}")
    return Preprocessing(resized[0], mean, std, resize, 1.0)


def _model_classes(transformers: Any, directory: Path, model_type: str) -> tuple[Any, Any]:
    """(class to call from_pretrained on, model class it builds) for this model type.

    Two-tower models give their vision tower class; everything else goes through AutoModel.
    """
    if model_type in VISION_TOWER_CLASSES:
        vision_class = getattr(transformers, VISION_TOWER_CLASSES[model_type])
        return vision_class, vision_class
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (KeyError, ValueError) as err:
        raise HFTowerError(
            f"transformers {transformers.__version__} does not know model type {model_type!r} "
            f"in {directory}; upgrade transformers or convert the checkpoint"
        ) from err
    if hasattr(config, "vision_config"):
        raise HFTowerError(
            f"unsupported model in {directory}: {model_type!r} is a multimodal model; only the "
            f"vision towers of {sorted(VISION_TOWER_CLASSES)} are extracted automatically. "
            "Save the vision tower alone with its *VisionModel.save_pretrained"
        )
    try:
        base = transformers.MODEL_MAPPING[type(config)]
    except KeyError:
        base = None
    if isinstance(base, (tuple, list)):
        base = base[0]
    if base is None or "pixel_values" not in _params(base.forward):
        raise HFTowerError(
            f"unsupported model in {directory}: {model_type!r} is not an image model (its "
            "base model takes no pixel_values); a third tower needs a vision backbone"
        )
    # AutoModel (not the *ForImageClassification architecture in config.json) gives the base
    # encoder without the classifier.
    return transformers.AutoModel, base


def _probe(features: HFVisionFeatures, preprocessing: Preprocessing, directory: Path) -> int:
    """One dummy forward at the declared size: fixes pool='auto' and measures the feature dim."""
    size = preprocessing.image_size
    probe = torch.zeros(1, 3, size, size)
    try:
        with torch.inference_mode():
            outputs = features.model(pixel_values=probe, return_dict=True)
    except Exception as err:  # any failure here means the model cannot serve as a tower
        raise HFTowerError(
            f"the Hugging Face model in {directory} failed on a {size}x{size} image "
            f"(size from {PREPROCESSOR_FILE} or config.image_size): {err}. Check that "
            f"{PREPROCESSOR_FILE} matches the model's image size"
        ) from err
    if features.pool == "auto":
        has_pooler = getattr(outputs, "pooler_output", None) is not None
        features.pool = "pooler" if has_pooler else "mean"
    pooled = pool_outputs(outputs, features.pool, features.name)
    if pooled.ndim != 2:
        raise HFTowerError(
            f"HF tower {features.name!r}: pooled features have shape {tuple(pooled.shape)}, "
            "not (batch, dim); force another pool mode"
        )
    return int(pooled.shape[-1])


def _config_image_size(config: Any) -> int | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return int(size) if isinstance(size, int) and size > 0 else None


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: a Hugging Face model directory needs its {what} "
            f"({file.name}), written by save_pretrained"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HFTowerError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise HFTowerError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _triple(value: Any, key: str, file: Path) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise HFTowerError(f"{file}: {key!r} must be three numbers (RGB), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _resample(value: Any, file: Path) -> str:
    if isinstance(value, str) and value.lower() in PIL_RESAMPLE.values():
        return value.lower()
    if isinstance(value, int) and value in PIL_RESAMPLE:
        return PIL_RESAMPLE[value]
    # Lanczos (1), box (4), hamming (5): no torch equivalent here; bicubic is the closest.
    warnings.warn(
        f"{file}: 'resample' {value!r} is not one of the supported PIL codes {PIL_RESAMPLE}; "
        "using bicubic",
        stacklevel=3,
    )
    return "bicubic"


def _params(function: Any) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()
