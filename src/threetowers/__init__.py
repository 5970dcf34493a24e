"""threetowers: Three Towers (3T), LiT and CLIP for contrastive image-text learning."""

from threetowers import losses
from threetowers.build import build_loss, build_model
from threetowers.config import Config, ConfigError, load_config
from threetowers.model import ThreeTowers
from threetowers.towers.frozen import FrozenBackbone, Preprocessing
from threetowers.towers.pretrained import BACKBONES, load_backbone

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
