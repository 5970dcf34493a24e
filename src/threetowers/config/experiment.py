"""The project's experiment grid: ``ExperimentConfig`` is a training config plus the
``pretrain`` and ``reproduce`` sections, read only by ``threetowers pretrain`` and
``threetowers reproduce``; a training run's config (and its config.yaml) has neither."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from threetowers.config.base import Section
from threetowers.config.model import ImageTowerConfig
from threetowers.config.root import Config

EXPERIMENT_SECTIONS = ("pretrain", "reproduce")


class PretrainConfig(Section):
    """Supervised pretraining of a classifier that later serves as a frozen tower."""

    data: str | None = Field(
        None,
        description="Class folders with train/ and val/; null: the world's set (world_set).",
    )
    world_set: Literal["objects", "scenes"] = Field(
        "objects", description="The world's classification set pretrained on."
    )
    architecture: Literal["cnn", "vit"] = Field("cnn", description="The classifier's network.")
    cnn_widths: list[PositiveInt] = Field(
        [16, 32, 64, 128], min_length=1, description="Channels of the cnn's stages."
    )
    vit: ImageTowerConfig = Field(ImageTowerConfig(), description="The vit's settings.")
    image_size: int = Field(64, gt=0, description="Input size in pixels.")
    steps: int = Field(1500, gt=0, description="Optimizer steps.")
    batch_size: int = Field(128, gt=0, description="Images per step.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    crop_scale: tuple[float, float] = Field(
        (0.6, 1.0), description="Area range of the random crops."
    )
    num_workers: int = Field(1, ge=0, description="Loader worker processes.")
    out: str = Field(
        "runs/pretrain/classifier.safetensors", description="Where the classifier is written."
    )


class ReproduceConfig(Section):
    """``threetowers reproduce``: which settings, how many seeds, and the --quick sizes."""

    settings: list[Literal["matched", "mismatched", "imagenet"]] = Field(
        ["matched", "mismatched", "imagenet"],
        description="The frozen towers compared: classifiers pretrained on the world's "
        "objects (matched) or scenes (mismatched), or ImageNet's EfficientNet-Lite0.",
    )
    seeds: int = Field(3, gt=0, description="Seeds of every run.")
    quick_steps: int = Field(100, gt=0, description="train.steps under --quick (one seed).")
    quick_pretrain_steps: int = Field(100, gt=0, description="pretrain.steps under --quick.")
    workers: int = Field(
        2, ge=1, description="Runs side by side, each on its share of the cores (1: in turn)."
    )
    scaling_axes: list[Literal["pairs", "towers", "third"]] = Field(
        ["pairs", "towers", "third"],
        description="The axes --experiment scaling trains (one alone: a third of the runs or "
        "less).",
    )

    @model_validator(mode="after")
    def _distinct_lists(self) -> ReproduceConfig:
        for name in ("settings", "scaling_axes"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct and not empty, got {values}")
        return self


class ExperimentConfig(Config):
    """A training config with the experiment grid's own settings."""

    pretrain: PretrainConfig = Field(
        PretrainConfig(), description="A classifier's pretraining (`threetowers pretrain`)."
    )
    reproduce: ReproduceConfig = Field(
        ReproduceConfig(), description="The experiment grid (`threetowers reproduce`)."
    )

    def training_config(self) -> Config:
        """The config one of its runs trains: every section but the grid's own."""
        return Config.model_validate(self.model_dump(exclude=set(EXPERIMENT_SECTIONS)))
