"""The classifier checkpoint: what ``threetowers pretrain`` writes and the third tower reads.

One ``.safetensors`` file, safe to load (no pickle, no code): tensors ``backbone.*`` and
``head.weight`` / ``head.bias``, plus string metadata

    format        "threetowers-classifier"   version "1"
    architecture  a key of ARCHITECTURES      architecture_config  JSON of its kwargs
    preprocessing JSON of Preprocessing        class_names          JSON list

so the file alone rebuilds the backbone, says how to feed it and what its classes are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.errors import UserError
from threetowers.files.atomic import save_tensors
from threetowers.towers.cnn import SmallResNet
from threetowers.towers.vit import VisionTransformer

FORMAT = "threetowers-classifier"
VERSION = "1"

# Backbones a classifier checkpoint can hold: name -> constructor from its JSON kwargs. Each
# returns a module mapping normalised images to pooled features, with ``feature_dim``.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallResNet,
    "vit": VisionTransformer,
}


class ClassifierCheckpointError(UserError, ValueError):
    """A file is not a usable classifier checkpoint; the message says which and why."""


@dataclass
class Classifier:
    """A pretrained backbone with its linear classification head, as stored in the file."""

    backbone: nn.Module
    head: nn.Linear
    architecture: str
    architecture_config: dict
    preprocessing: Preprocessing
    class_names: list[str]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def save_classifier(path: str | Path, classifier: Classifier) -> None:
    if classifier.architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {classifier.architecture!r}; "
            f"choose one of {sorted(ARCHITECTURES)}"
        )
    if classifier.head.out_features != len(classifier.class_names):
        raise ValueError(
            f"the head has {classifier.head.out_features} outputs but "
            f"{len(classifier.class_names)} class names were given"
        )
    tensors = {f"backbone.{k}": v for k, v in classifier.backbone.state_dict().items()}
    tensors |= {f"head.{k}": v for k, v in classifier.head.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": classifier.architecture,
        "architecture_config": json.dumps(classifier.architecture_config),
        "preprocessing": json.dumps(classifier.preprocessing.to_dict()),
        "class_names": json.dumps(classifier.class_names),
    }
    save_tensors(path, tensors, metadata)  # a killed pretrain leaves no half classifier


def load_classifier(path: str | Path | None) -> Classifier:
    if path is None or not Path(path).is_file():
        raise ClassifierCheckpointError(
            f"classifier checkpoint {path} not found; make one with `threetowers pretrain` and "
            "set model.frozen.0.path to the .safetensors file it writes"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ClassifierCheckpointError(
            f"{path}: not a readable safetensors file ({error})"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ClassifierCheckpointError(
            f"{path}: not a threetowers classifier checkpoint (metadata format "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if metadata.get("version") != VERSION:
        raise ClassifierCheckpointError(
            f"{path}: checkpoint version {metadata.get('version')!r}; this threetowers reads "
            f"version {VERSION}"
        )
    architecture = metadata.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ClassifierCheckpointError(
            f"{path}: unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}"
        )
    try:
        config = json.loads(metadata["architecture_config"])
        preprocessing = Preprocessing(**json.loads(metadata["preprocessing"]))
        class_names = list(json.loads(metadata["class_names"]))
        backbone = ARCHITECTURES[architecture](**config)
        backbone.load_state_dict(_prefixed(tensors, "backbone."), strict=True)
        head_state = _prefixed(tensors, "head.")
        head = nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0])
        head.load_state_dict(head_state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ClassifierCheckpointError(f"{path}: inconsistent checkpoint ({error})") from None
    return Classifier(
        backbone.eval(), head.eval(), architecture, config, preprocessing, class_names
    )


def load_classifier_backbone(path: str | Path | None) -> FrozenBackbone:
    """The checkpoint's backbone, without its head, as a frozen third tower."""
    classifier = load_classifier(path)
    return FrozenBackbone(
        classifier.backbone,
        classifier.preprocessing,
        feature_dim=classifier.head.in_features,
        name=f"checkpoint:{Path(path).name}",
        channels_last=classifier.architecture == "cnn",
    )


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
