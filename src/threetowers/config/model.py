"""The ``model`` section: the trained towers f and g, the frozen towers and the heads.

The choices and the cross-field checks are the library's own (towers/, backbones/registry.py,
model/): the validators call the very checks the modules' constructors run, so a config and a
Python caller are told the same thing.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from threetowers.backbones.registry import (
    BACKBONES,
    PAIR_BACKBONE,
    TEXT_BACKBONES,
    FrozenPool,
    check_backbone,
)
from threetowers.config.base import Section
from threetowers.model.objective import Mode, Structure, structure
from threetowers.model.three_towers import FrozenHeadKind, HeadKind
from threetowers.towers.text import TextPool, check_text_shape
from threetowers.towers.vit import ImagePool, check_vit_shape


class ImageTowerConfig(Section):
    """The image tower f: a Vision Transformer trained from scratch (towers/vit.py)."""

    image_size: int = Field(64, gt=0, description="Input size in pixels (square images).")
    patch_size: int = Field(8, gt=0, description="Patch size in pixels; divides image_size.")
    width: int = Field(192, gt=0, description="Width of the Transformer; divisible by heads.")
    depth: int = Field(6, gt=0, description="Number of Transformer blocks.")
    heads: int = Field(3, gt=0, description="Attention heads per block.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of width.")
    pool: ImagePool = Field(
        "gap",
        description="How the tokens become one vector: cls (a class token), gap (mean over "
        "patches) or map (attention pooling with a learned query).",
    )
    class_token: bool | None = Field(
        None,
        description="null: a class token for cls pooling only. true with gap: OpenCLIP's avg "
        "pooling (the token attends, the mean leaves it out), the gap tower that `export` can "
        "write. cls needs it, map has none.",
    )

    @model_validator(mode="after")
    def _shapes_fit(self) -> ImageTowerConfig:
        check_vit_shape(
            self.image_size, self.patch_size, self.width, self.heads, self.pool, self.class_token
        )
        return self


class TextTowerConfig(Section):
    """The text tower g: a Transformer over token ids trained from scratch (towers/text.py)."""

    vocab_size: int = Field(8192, gt=1, description="Tokenizer vocabulary size.")
    context_length: int = Field(32, gt=0, description="Longest caption, in tokens.")
    width: int = Field(192, gt=0, description="Width of the Transformer; divisible by heads.")
    depth: int = Field(4, gt=0, description="Number of Transformer blocks.")
    heads: int = Field(3, gt=0, description="Attention heads per block.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of width.")
    causal: bool = Field(False, description="Causal (left-to-right) attention.")
    pool: TextPool = Field(
        "mean",
        description="How the tokens become one vector: eot (the last non-padding token), first "
        "(a leading token; needs causal false) or mean over non-padding tokens.",
    )
    pad_id: int = Field(0, ge=0, description="Token id of padding; inside the vocabulary.")
    length_buckets: int = Field(
        8,
        ge=1,
        description="CPU only: run a batch in this many buckets of similar caption length, "
        "each trimmed to its longest (1: off).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TextTowerConfig:
        check_text_shape(
            self.vocab_size, self.width, self.heads, self.causal, self.pool, self.pad_id
        )
        return self


DISTILL_WEIGHT = 1.0


class FrozenTowerConfig(Section):
    """One frozen pretrained tower k: its backbone, what the backbone needs, W_k, the weights
    of its two alignment terms (3t)."""

    name: str = Field(
        "h",
        pattern=r"^[a-z][a-z0-9]{0,15}$",
        description="Unique; names the tower's heads (W_k as k, W_f->k as fk, W_g->k as gk), "
        "its loss terms (fk_k, gk_k), metric keys, caches and logs. A pair p is two towers, "
        "pimg and ptxt, each named so, and its distillation term fg_p.",
    )
    backbone: str = Field(
        "efficientnet_lite0",
        description=f"The pretrained network; one of {', '.join(sorted(BACKBONES))} "
        f"({', '.join(TEXT_BACKBONES)} read captions; {PAIR_BACKBONE}: an image-text model "
        "whose two sides share a space, a CLIP teacher, from path: a transformers CLIP or "
        "SigLIP folder, a `threetowers export --format open_clip` folder or a run directory).",
    )
    path: str | None = Field(
        None,
        description="Its weights or model folder (needed by checkpoint, hf, hf_text, pair).",
    )
    pool: FrozenPool = Field(
        "auto",
        description="How the backbone's features are pooled: auto (the backbone's own way), or "
        "for hf backbones cls, pooler or mean.",
    )
    head: FrozenHeadKind = Field(
        "linear",
        description="The head W_k on the tower's features (identity needs embed_dim equal to "
        "the feature dim).",
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="Input size; null: the backbone's own. Convolutional backbones accept "
        "smaller inputs, which cost quadratically less (EfficientNet-Lite0: 224 px native). "
        "Not for text backbones.",
    )
    # Per tower, not per loss: each tower's terms have their own names (fk_k, gk_k), and a
    # tower added to a list keeps its weights with it.
    f_weight: float = Field(
        1.0, ge=0, description="Weight of the term aligning f with this tower (fk_k; 3t only)."
    )
    g_weight: float = Field(
        1.0, ge=0, description="Weight of the term aligning g with this tower (gk_k; 3t only)."
    )
    distill_weight: float = Field(
        DISTILL_WEIGHT,
        ge=0,
        description="A pair's only: weight of its distillation term fg_p (3t), the KL between "
        "its in-batch image-text distributions and f and g's (0: aligned only).",
    )

    @property
    def is_pair(self) -> bool:
        return self.backbone == PAIR_BACKBONE

    @model_validator(mode="after")
    def _known(self) -> FrozenTowerConfig:
        check_backbone(self.backbone, self.path, self.image_size)
        # a run's config.yaml writes every key of every tower: only another value is refused
        if self.distill_weight != DISTILL_WEIGHT and not self.is_pair:
            raise ValueError(
                f"distill_weight is a frozen pair's (backbone {PAIR_BACKBONE}), and this tower's "
                f"backbone is {self.backbone!r}; remove distill_weight"
            )
        return self


class ModelConfig(Section):
    """The model: its mode, the trained towers f and g, the frozen towers and the heads."""

    mode: Mode = Field(
        "3t",
        description="clip (f and g only), lit (one frozen tower locked in f's place, or in g's "
        "for a text backbone) or 3t (f and g, each aligned with every frozen tower).",
    )
    embed_dim: int = Field(128, gt=0, description="Dimension of the shared embedding space.")
    head: HeadKind = Field("linear", description="The heads W of the trained towers f and g.")
    share_alignment_heads: bool = Field(
        False, description="3t: f and g reuse W_f and W_g towards every frozen tower."
    )
    image: ImageTowerConfig = Field(ImageTowerConfig(), description="The image tower f.")
    text: TextTowerConfig = Field(TextTowerConfig(), description="The text tower g.")
    frozen: list[FrozenTowerConfig] = Field(
        [FrozenTowerConfig()],
        description="The frozen towers, in order (clip builds none of them; lit takes one). "
        "A dotted override names one by position: model.frozen.0.backbone=...",
    )

    def structure(self) -> Structure:
        """The towers, heads and terms this config builds (model/objective.py)."""
        text = [tower.name for tower in self.frozen if tower.backbone in TEXT_BACKBONES]
        pairs = [tower.name for tower in self.frozen if tower.is_pair]
        return structure(self.mode, [tower.name for tower in self.frozen], text, pairs)

    @model_validator(mode="after")
    def _towers_fit_the_mode(self) -> ModelConfig:
        self.structure()  # raises the library's own message
        return self
