"""threetowers: Three Towers (3T), LiT and CLIP for contrastive image-text learning."""

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.backbones.registry import BACKBONES, load_backbone
from threetowers.config import Config, ConfigError, load_config
from threetowers.model import losses
from threetowers.model.build import build_loss, build_model
from threetowers.model.three_towers import ThreeTowers

__all__ = [
    "BACKBONES",
    "Config",
    "ConfigError",
    "FrozenBackbone",
    "Preprocessing",
    "ThreeTowers",
    "build_loss",
    "build_model",
    "load_backbone",
    "load_config",
    "losses",
]
__version__ = "0.1.0"
