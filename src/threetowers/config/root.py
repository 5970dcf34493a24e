"""``Config``: everything one training run reads, and so what its config.yaml records."""

from __future__ import annotations

from pydantic import Field, model_validator

from threetowers.config.base import Section
from threetowers.config.data import DataConfig
from threetowers.config.loss import LossConfig
from threetowers.config.model import ModelConfig
from threetowers.config.run import EvalConfig, TrainConfig
from threetowers.model.losses import check_term_weights
from threetowers.model.objective import term_weights


class Config(Section):
    """A training run: its model, loss, data, optimisation and benchmarks."""

    model: ModelConfig = Field(ModelConfig(), description="The towers and heads.")
    loss: LossConfig = Field(LossConfig(), description="The contrastive terms.")
    data: DataConfig = Field(DataConfig(), description="The training data.")
    train: TrainConfig = Field(TrainConfig(), description="The optimisation and run directory.")
    eval: EvalConfig = Field(EvalConfig(), description="The benchmarks.")

    @model_validator(mode="after")
    def _some_term_weighs(self) -> Config:
        # Across sections (the main weight is the loss's, the others the towers'): checked
        # by the loss's own check, as the loss module runs it.
        check_term_weights(self.model.structure().terms, model_term_weights(self.model, self.loss))
        return self


def model_term_weights(model: ModelConfig, loss: LossConfig) -> dict[str, float]:
    """Each term's weight: loss.weights.f_g for the main pair, each frozen tower's f_weight and
    g_weight for its own, a pair's distill_weight for its distillation term; none without
    aligned towers (clip, lit: one term, of weight 1)."""
    sides = {tower.name: (tower.f_weight, tower.g_weight) for tower in model.frozen}
    distill = {tower.name: tower.distill_weight for tower in model.frozen}
    return term_weights(model.structure(), loss.weights.f_g, sides, distill)
