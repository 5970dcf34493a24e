"""Tiny random Hugging Face vision models saved to a folder, offline.

Importing this skips when transformers is missing."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

SIZE = 32
TINY_VIT = dict(
    image_size=SIZE,
    patch_size=8,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
)


def _cls(name: str):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _write_preprocessor(directory, **cfg) -> None:
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg))


def write_clip_preprocessor(directory) -> None:
    """CLIP's own image processing (OpenAI's statistics, bicubic, a centre crop) at SIZE."""
    _write_preprocessor(
        directory,
        image_processor_type="CLIPImageProcessor",
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        size={"shortest_edge": SIZE},
        do_center_crop=True,
        crop_size={"height": SIZE, "width": SIZE},
    )


def write_siglip_preprocessor(directory) -> None:
    """SigLIP's own image processing (0.5 statistics, bilinear, no crop) at SIZE."""
    _write_preprocessor(
        directory,
        image_processor_type="SiglipImageProcessor",
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=2,
        size={"height": SIZE, "width": SIZE},
    )


def _save_vit(directory, preprocessor: bool = True):
    torch.manual_seed(0)
    model = _cls("ViTForImageClassification")(transformers.ViTConfig(num_labels=5, **TINY_VIT))
    model.eval().save_pretrained(directory)
    if preprocessor:
        _write_preprocessor(
            directory,
            image_processor_type="ViTImageProcessor",
            do_normalize=True,
            image_mean=[0.5, 0.4, 0.3],
            image_std=[0.2, 0.25, 0.3],
            resample=2,
            size={"height": SIZE, "width": SIZE},
        )
    return model
