"""A frozen image-text pair: two towers whose embeddings share one space (a CLIP teacher).

Which caption fits which image, and by how much, is what such a pair knows beyond a single
tower, and what distillation teaches (``model.losses.distillation_term``). A
:class:`FrozenPair` is its two sides, each a frozen tower of its own kind (the image side a
:class:`~threetowers.backbones.frozen.FrozenBackbone` of pixels, the text side a
:class:`~threetowers.backbones.text_encoder.FrozenTextEncoder` of captions), so each is cached
per shard like any frozen tower, and the pair's own learned scale.

From a ``transformers`` CLIP or SigLIP folder written by ``save_pretrained`` (with its
tokenizer's ``tokenizer.json`` and its ``preprocessor_config.json``): each side gives the
model's own ``get_image_features`` / ``get_text_features``, the embeddings its scale
compares. SigLIP's text tower reads the last position of a caption padded to its full
length (it was trained so), which the text side keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from threetowers.backbones.frozen import FrozenBackbone
from threetowers.backbones.hf import HFTowerError, load_preprocessing
from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.errors import require

PAIR_MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}


@dataclass(frozen=True)
class FrozenPair:
    """A frozen image-text model's two sides and its scale (``exp`` of its learned log)."""

    image: FrozenBackbone
    text: FrozenTextEncoder
    scale: float


class _ImageEmbeddings(nn.Module):
    """Normalised pixels -> the pair's image embeddings (unnormalised), float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _embeddings(self.model.get_image_features(pixel_values=pixel_values)).float()


class PairText(FrozenTextEncoder):
    """Captions -> the pair's text embeddings (unnormalised): ``get_text_features``."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, name: str, full_length: bool):
        text = model.config.text_config
        limit = int(text.max_position_embeddings)
        dim = int(getattr(model.config, "projection_dim", 0) or text.hidden_size)
        super().__init__(model, tokenizer, max_length=limit, name=name, feature_dim=dim)
        self.full_length = full_length  # pad every caption to max_length (SigLIP)
        if full_length:
            self.tokenizer.enable_padding(
                pad_id=self.tokenizer.padding["pad_id"],
                pad_token=self.tokenizer.padding["pad_token"],
                length=limit,
            )

    def _features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.full_length:  # SigLIP attends to every position, padding included
            inputs = {"input_ids": inputs["input_ids"]}
        return _embeddings(self.model.get_text_features(**inputs)).float()

    def _trimmed(self) -> bool:
        return not self.full_length

    def _digest_settings(self) -> list:
        return ["pair", self.full_length, self.max_length, self.tokenizer.to_str()]


def load_pair(path: str | Path) -> FrozenPair:
    """The pair in ``path``, whichever of its three forms: a ``transformers`` CLIP or SigLIP
    folder, a ``threetowers export --format open_clip`` folder, or a run of this project."""
    folder = Path(path)
    if not folder.is_dir():
        raise HFTowerError(
            f"frozen pair {folder} is not a folder; give a transformers CLIP or SigLIP folder, "
            "a `threetowers export --format open_clip` folder or a run directory"
        )
    if (folder / "config.json").is_file():
        return load_transformers_pair(folder)
    from threetowers.backbones.trained_pair import load_open_clip_pair, load_run_pair, pair_kind

    kind = pair_kind(folder)
    if kind == "open_clip":
        return load_open_clip_pair(folder)
    if kind == "run":
        return load_run_pair(folder)
    raise HFTowerError(
        f"{folder} holds no image-text pair this tool reads: not a transformers CLIP or SigLIP "
        "folder (config.json), a `threetowers export --format open_clip` folder "
        "(open_clip_config.json) or a run directory (config.yaml and checkpoints)"
    )


def load_transformers_pair(path: str | Path) -> FrozenPair:
    """The pair in a ``transformers`` CLIP or SigLIP folder (no network)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise HFTowerError(
            f"{folder} is not a transformers model folder (no config.json); give the folder "
            "a CLIPModel or SiglipModel was saved into with save_pretrained"
        )
    transformers = require("transformers", "a transformers CLIP or SigLIP pair")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in PAIR_MODEL_TYPES:
        raise HFTowerError(
            f"{folder} holds a {config.model_type!r} model; a frozen pair is a CLIP or SigLIP "
            f"model ({', '.join(PAIR_MODEL_TYPES)}) whose image and text towers share a space"
        )
    if not (folder / "tokenizer.json").is_file():
        raise HFTowerError(
            f"{folder} has no tokenizer.json (a fast tokenizer's file); save the pair's "
            "tokenizer with it (tokenizer.save_pretrained(folder))"
        )
    model_class = getattr(transformers, PAIR_MODEL_TYPES[config.model_type])
    model = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    model = model.float().eval()
    name = f"pair-{folder.name}"
    preprocessing = load_preprocessing(folder, int(config.vision_config.image_size))
    image = FrozenBackbone(_ImageEmbeddings(model), preprocessing, name=f"{name}-image")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = PairText(model, tokenizer, f"{name}-text", config.model_type == "siglip")
    return FrozenPair(image, text, math.exp(float(model.logit_scale)))


def _embeddings(output) -> torch.Tensor:
    """``get_*_features``' embeddings: a tensor before transformers 5, its pooler_output
    since."""
    return output if torch.is_tensor(output) else output.pooler_output
