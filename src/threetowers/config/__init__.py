"""Structured, validated configs: YAML files or named presets plus dotted ``key=value`` overrides.

Pydantic models give types, ranges and unknown-key rejection (the sections: model.py, loss.py,
data.py, run.py, root.py; the experiment grid's: experiment.py); loading.py turns every failure
into one ``ConfigError``; keys that moved are read in their new place (migrations.py). The
reference of every key, docs/config-reference.md, is generated from the fields (reference.py).
"""

from threetowers.config.base import ConfigError, Section
from threetowers.config.data import DataConfig, TrainSource, WorldConfig
from threetowers.config.experiment import ExperimentConfig, PretrainConfig, ReproduceConfig
from threetowers.config.loading import (
    PRESETS_DIR,
    load_config,
    load_experiment_config,
    preset_names,
    read_mapping,
    refuse_repeated_keys,
)
from threetowers.config.loss import LossConfig, TermWeights
from threetowers.config.migrations import ConfigMigrationWarning
from threetowers.config.model import (
    FrozenTowerConfig,
    ImageTowerConfig,
    ModelConfig,
    TextTowerConfig,
)
from threetowers.config.root import Config, model_term_weights
from threetowers.config.run import EvalConfig, TrainConfig

__all__ = [
    "PRESETS_DIR",
    "Config",
    "ConfigError",
    "ConfigMigrationWarning",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FrozenTowerConfig",
    "ImageTowerConfig",
    "LossConfig",
    "ModelConfig",
    "PretrainConfig",
    "ReproduceConfig",
    "Section",
    "TermWeights",
    "TextTowerConfig",
    "TrainConfig",
    "TrainSource",
    "WorldConfig",
    "load_config",
    "load_experiment_config",
    "model_term_weights",
    "preset_names",
    "read_mapping",
    "refuse_repeated_keys",
]
