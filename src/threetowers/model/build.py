"""From validated configs to a ``ThreeTowers`` model."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import replace

import torch

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.backbones.pair import FrozenPair
from threetowers.backbones.registry import load_backbone
from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.config import (
    Config,
    ConfigError,
    FrozenTowerConfig,
    LossConfig,
    ModelConfig,
    model_term_weights,
)
from threetowers.model.losses import ThreeTowersLoss
from threetowers.model.objective import Structure, distillation_term, pair_sides
from threetowers.model.three_towers import ThreeTowers
from threetowers.towers.text import TextTransformer
from threetowers.towers.vit import VisionTransformer

# From-scratch towers see [-1, 1] pixels from a centre square (CLIP-style crop_fraction 1).
SCRATCH_MEAN = SCRATCH_STD = (0.5, 0.5, 0.5)


def structure_of(model_cfg: ModelConfig) -> Structure:
    """The towers, heads and terms of a model config."""
    return model_cfg.structure()


FrozenTower = FrozenBackbone | FrozenTextEncoder


def build_loss(
    model_cfg: ModelConfig, cfg: LossConfig, pair_scales: Mapping[str, float] | None = None
) -> ThreeTowersLoss:
    """The loss of the config; ``pair_scales``: each frozen pair's own scale, by name (the
    teacher's scale of its distillation term)."""
    return ThreeTowersLoss(
        structure_of(model_cfg).terms,
        kind=cfg.kind,
        weights=model_term_weights(model_cfg, cfg),
        shared_temperature=cfg.shared_temperature,
        init_scale=cfg.init_scale if cfg.init_scale is not None else 10.0,
        max_scale=cfg.max_scale,
        init_bias=cfg.init_bias,
        alignment=cfg.alignment,
        block_size=cfg.block_size,
        teacher_scales={
            distillation_term(name): scale for name, scale in (pair_scales or {}).items()
        },
    )


def build_frozen_tower(tower: FrozenTowerConfig) -> FrozenTower | FrozenPair:
    """The configured frozen backbone, at ``tower.image_size`` when one is set."""
    backbone = load_backbone(tower.backbone, tower.path, tower.pool)
    if tower.image_size is not None:  # image towers only (the config checks)
        backbone.preprocessing = replace(backbone.preprocessing, image_size=tower.image_size)
    return backbone


def build_frozen_towers(
    model_cfg: ModelConfig,
    given: FrozenBackbone | Mapping[str, FrozenTower | FrozenPair] | None = None,
) -> dict[str, FrozenTower]:
    """The frozen towers the model of ``model_cfg`` runs, by name (a pair's two sides by
    theirs): ``given`` ones (a mapping by the config's names, or one FrozenBackbone for a
    one-tower config) replace the configured backbones."""
    return _frozen_towers(model_cfg, given)[0]


def _frozen_towers(
    model_cfg: ModelConfig,
    given: FrozenBackbone | Mapping[str, FrozenTower | FrozenPair] | None = None,
) -> tuple[dict[str, FrozenTower], dict[str, float]]:
    """(the frozen towers by name, each frozen pair's own scale by the pair's name)."""
    structure = structure_of(model_cfg)
    if isinstance(given, torch.nn.Module):  # one tower; a dict names several
        if len(structure.frozen) > 1:
            raise ConfigError(
                f"one FrozenBackbone given for {len(structure.frozen)} frozen towers "
                f"{list(structure.frozen)}; pass a dict by tower name"
            )
        given = {name: given for name in structure.frozen}
    given = dict(given or {})
    for name, tower in given.items():
        if name in structure.pairs:
            wanted, fix = FrozenPair, "a FrozenPair (backbones/pair.py)"
        elif name in structure.text:
            wanted, fix = FrozenTextEncoder, "a FrozenTextEncoder (backbones/text_encoder.py)"
        else:
            wanted, fix = (
                FrozenBackbone,
                "a FrozenBackbone: wrap your module as threetowers.FrozenBackbone(module, "
                "threetowers.Preprocessing(image_size, mean, std))",
            )
        if not isinstance(tower, wanted):
            raise ConfigError(f"frozen tower {name!r} must be {fix}")
    towers, scales = {}, {}
    for position, tower in enumerate(model_cfg.frozen):
        if tower.name not in structure.frozen and tower.name not in structure.pairs:
            continue  # clip never builds, loads or runs a frozen tower
        built = given.get(tower.name) or build_frozen_tower(tower)
        if isinstance(built, FrozenPair):
            scales[tower.name] = built.scale
            sides = dict(zip(pair_sides(tower.name), (built.image, built.text), strict=True))
        else:
            sides = {tower.name: built}
        for name, side in sides.items():
            # Checked here rather than by make_head, to name the config key: only a built
            # backbone knows its feature dim.
            if tower.head == "identity" and side.feature_dim != model_cfg.embed_dim:
                key = f"model.frozen.{position}"
                raise ConfigError(
                    f"{key}.head 'identity' needs embed_dim == frozen tower {name!r}'s "
                    f"feature dim ({side.feature_dim}), got embed_dim {model_cfg.embed_dim}; "
                    f"use {key}.head=linear"
                )
            towers[name] = side
    return towers, scales


def build_model(
    cfg: Config | ModelConfig,
    frozen: FrozenBackbone | Mapping[str, FrozenBackbone] | None = None,
    device: str | torch.device | None = None,
) -> ThreeTowers:
    """Build the model of ``cfg`` (a full Config, or a ModelConfig with the default loss).

    ``frozen`` replaces configured frozen backbones: a mapping by tower name, or one
    FrozenBackbone for a one-tower config (any module wrapped as FrozenBackbone). ``device``
    gets the model built on the CPU and moved there; ``device="meta"`` builds the trainable
    towers without memory, e.g. to count parameters of the paper-scale presets (frozen towers
    are still loaded for real).
    """
    model_cfg, loss_cfg = (cfg.model, cfg.loss) if isinstance(cfg, Config) else (cfg, LossConfig())
    structure = structure_of(model_cfg)
    towers, pair_scales = _frozen_towers(model_cfg, frozen)

    # The trainable towers are built on the CPU and then moved, so that a seed gives the same
    # initial weights on any device (a GPU would draw them from its own generator).
    meta = device is not None and torch.device(device).type == "meta"
    with torch.device("meta") if meta else nullcontext():
        image_tower = image_preprocessing = None
        if structure.trains_image_tower:
            image = model_cfg.image
            image_tower = VisionTransformer(**image.model_dump())
            image_preprocessing = Preprocessing(
                image.image_size, SCRATCH_MEAN, SCRATCH_STD, resize="bicubic", crop_fraction=1.0
            )
        model = ThreeTowers(
            structure,
            text_tower=(
                TextTransformer(**model_cfg.text.model_dump())
                if structure.trains_text_tower
                else None
            ),
            embed_dim=model_cfg.embed_dim,
            loss_fn=build_loss(model_cfg, loss_cfg, pair_scales),
            image_tower=image_tower,
            image_preprocessing=image_preprocessing,
            frozen=towers,
            head=model_cfg.head,
            frozen_heads={
                name: tower.head
                for tower in model_cfg.frozen
                for name in (pair_sides(tower.name) if tower.is_pair else (tower.name,))
            },
            share_alignment_heads=model_cfg.share_alignment_heads,
        )
    if device is not None and not meta:
        model.to(device)
    return model


def frozen_digests(model: ThreeTowers) -> dict[str, str]:
    """Each frozen tower's digest (its weights and preprocessing), by name: what a checkpoint
    records and what resuming or loading the run checks (``files/checkpoints.py``)."""
    return {name: tower.digest() for name, tower in model.frozen.items()}


def frozen_sources(model_cfg: ModelConfig) -> dict[str, str]:
    """Where each frozen tower is configured, by name (a pair's two sides by theirs)."""
    out = {}
    for position, tower in enumerate(model_cfg.frozen):
        where = f"model.frozen[{position}] {tower.name!r} ({tower.backbone}"
        where += f" at {tower.path})" if tower.path else ")"
        out[tower.name] = where
        if tower.is_pair:
            image, text = pair_sides(tower.name)
            out |= {image: f"{where}'s image side", text: f"{where}'s text side"}
    return out
