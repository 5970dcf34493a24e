"""From validated configs to a ``ThreeTowers`` model."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.backbones.registry import load_backbone
from threetowers.config import Config, ConfigError, LossConfig, ModelConfig, ThirdTowerConfig
from threetowers.model.losses import ThreeTowersLoss
from threetowers.model.three_towers import ThreeTowers
from threetowers.towers.text import TextTransformer
from threetowers.towers.vit import VisionTransformer

# From-scratch towers see [-1, 1] pixels from a centre square (CLIP-style crop_fraction 1).
SCRATCH_MEAN = SCRATCH_STD = (0.5, 0.5, 0.5)


def build_loss(mode: str, cfg: LossConfig) -> ThreeTowersLoss:
    return ThreeTowersLoss(
        mode=mode,
        kind=cfg.kind,
        weights=cfg.weights.model_dump(),
        shared_temperature=cfg.shared_temperature,
        init_scale=cfg.init_scale if cfg.init_scale is not None else 10.0,
        max_scale=cfg.max_scale,
        init_bias=cfg.init_bias,
        alignment=cfg.alignment,
        block_size=cfg.block_size,
    )


def build_third_tower(third: ThirdTowerConfig) -> FrozenBackbone:
    """The configured frozen backbone, at ``third.image_size`` when one is set."""
    tower = load_backbone(third.backbone, third.path, third.pool)
    if third.image_size is not None:
        tower.preprocessing = replace(tower.preprocessing, image_size=third.image_size)
    return tower


def build_model(
    cfg: Config | ModelConfig,
    third_tower: FrozenBackbone | None = None,
    device: str | torch.device | None = None,
) -> ThreeTowers:
    """Build the model of ``cfg`` (a full Config, or a ModelConfig with the default loss).

    ``third_tower`` replaces the configured backbone (any module wrapped as FrozenBackbone).
    ``device`` gets the model built on the CPU and moved there; ``device="meta"`` builds the
    trainable towers without memory, e.g. to count parameters of the paper-scale presets (the
    third tower is still loaded for real).
    """
    model_cfg, loss_cfg = (cfg.model, cfg.loss) if isinstance(cfg, Config) else (cfg, LossConfig())
    mode = model_cfg.mode
    if mode == "clip":
        third_tower = None  # clip never builds, loads or runs h
    elif third_tower is None:
        third_tower = build_third_tower(model_cfg.third)
    elif not isinstance(third_tower, FrozenBackbone):
        raise ConfigError(
            "third_tower must be a FrozenBackbone: wrap your module as "
            "threetowers.FrozenBackbone(module, threetowers.Preprocessing(image_size, mean, std))"
        )
    if third_tower is not None and model_cfg.third.head == "identity":
        if third_tower.feature_dim != model_cfg.embed_dim:
            raise ConfigError(
                f"model.third.head 'identity' needs embed_dim == the third tower's feature dim "
                f"({third_tower.feature_dim}), got embed_dim {model_cfg.embed_dim}; "
                "use model.third.head=linear"
            )

    # The trainable towers are built on the CPU and then moved, so that a seed gives the same
    # initial weights on any device (a GPU would draw them from its own generator).
    meta = device is not None and torch.device(device).type == "meta"
    with torch.device("meta") if meta else nullcontext():
        image_tower = image_preprocessing = None
        if mode != "lit":
            image = model_cfg.image
            image_tower = VisionTransformer(**image.model_dump())
            image_preprocessing = Preprocessing(
                image.image_size, SCRATCH_MEAN, SCRATCH_STD, resize="bicubic", crop_fraction=1.0
            )
        model = ThreeTowers(
            mode=mode,
            text_tower=TextTransformer(**model_cfg.text.model_dump()),
            embed_dim=model_cfg.embed_dim,
            objective=build_loss(mode, loss_cfg),
            image_tower=image_tower,
            image_preprocessing=image_preprocessing,
            third_tower=third_tower,
            head=model_cfg.head,
            third_head=model_cfg.third.head if model_cfg.third is not None else "linear",
            share_alignment_heads=model_cfg.share_alignment_heads,
        )
    if device is not None and not meta:
        model.to(device)
    return model
