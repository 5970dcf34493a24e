"""A tiny classifier checkpoint (backbones/classifier.py), to serve as a frozen tower."""

from __future__ import annotations

import torch

import threetowers as tt
from threetowers.backbones.classifier import Classifier
from threetowers.towers.vit import VisionTransformer

ARCH = {"image_size": 16, "patch_size": 8, "width": 24, "depth": 1, "heads": 2, "pool": "cls"}


def make_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(
        backbone=VisionTransformer(**ARCH),
        head=torch.nn.Linear(24, 3),
        architecture="vit",
        architecture_config=ARCH,
        preprocessing=tt.Preprocessing(16, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
        class_names=["circle", "square", "star"],
    )
