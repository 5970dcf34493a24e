"""The ``loss`` section: the kind of contrastive term, its learned scales, the main weight."""

from __future__ import annotations

from pydantic import Field, model_validator

from threetowers.config.base import Section
from threetowers.model.losses import Alignment, LossKind


class TermWeights(Section):
    """Weights of the terms; the loss is their weighted mean. A frozen tower's own terms are
    weighted by its f_weight and g_weight (model.frozen)."""

    f_g: float = Field(
        1.0, ge=0, description="Weight of the main image-text term f_g (3t; 0 drops it)."
    )


class LossConfig(Section):
    """The contrastive terms and how they are weighted (model/losses.py)."""

    kind: LossKind = Field(
        "softmax", description="softmax (InfoNCE, as CLIP) or sigmoid (pairwise, as SigLIP)."
    )
    shared_temperature: bool = Field(
        False, description="One learned scale (and bias) for all terms instead of one each."
    )
    init_scale: float | None = Field(
        None, gt=0, description="Initial scale; null: 10 for both kinds (big_vision, SigLIP)."
    )
    max_scale: float = Field(100.0, gt=0, description="The learned scale is clamped to this.")
    init_bias: float = Field(-10.0, description="Initial learned bias (sigmoid only).")
    weights: TermWeights = Field(TermWeights(), description="Weights of the terms.")
    alignment: Alignment = Field(
        "contrastive",
        description="How f and g align with a frozen tower (3t): a contrastive term, or l2 "
        "(mean squared distance of the paired embeddings).",
    )
    block_size: int = Field(
        0,
        ge=0,
        description=">0: contrastive terms computed this many rows at a time, exactly (same "
        "loss and gradients) in O(B*block_size) memory instead of O(B^2); 0: the plain B x B "
        "logits.",
    )

    @model_validator(mode="after")
    def _scale_in_range(self) -> LossConfig:
        if self.init_scale is not None and self.init_scale > self.max_scale:
            raise ValueError(f"init_scale {self.init_scale} exceeds max_scale {self.max_scale}")
        return self
