"""A tiny 3T model with a frozen pair (h, and the transformers CLIP pair t of
``pair_models``), image files the pair reads as they are, and the pair's own embeddings of
them computed by transformers itself: the reference of the pair's part in the apps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import threetowers as tt
from tests.conftest import tiny_backbone
from tests.helpers.hf_models import SIZE, _cls
from tests.helpers.pair_models import CAPTIONS, save_clip
from threetowers.data.tokenizer import CaptionTokenizer

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])  # write_clip_preprocessor's
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


@dataclass
class PairModel:
    cfg: tt.Config
    model: tt.ThreeTowers
    tokenizer: CaptionTokenizer
    clip: torch.nn.Module  # the pair t, as transformers runs it
    folder: Path  # the pair's transformers folder


def pair_model(folder: Path) -> PairModel:
    """A tiny 3T model whose frozen towers are h (a tiny CNN) and the pair t (8-dim sides)."""
    clip = save_clip(folder)
    torch.manual_seed(0)
    cfg = tt.load_config(
        "tiny",
        [
            "model.embed_dim=16",
            "model.frozen.1.name=t",
            "model.frozen.1.backbone=pair",
            f"model.frozen.1.path={folder}",
        ],
    )
    model = tt.build_model(cfg, frozen={"h": tiny_backbone()}).eval()
    tokenizer = CaptionTokenizer.train(CAPTIONS, vocab_size=512, context_length=16)
    return PairModel(cfg, model, tokenizer, clip, folder)


def square_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` random RGB PNGs of the pair's own size (its resize and crop keep them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        path = folder / f"{number:03d}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def own_embeddings(
    pair: PairModel, paths: list[Path], captions: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own normalised embeddings of the image files (CLIP's statistics) and of
    the captions (its tokenizer of the pair's tokenizer.json)."""
    pixels = torch.stack(
        [torch.tensor(np.asarray(Image.open(path).convert("RGB"))) for path in paths]
    )
    pixels = ((pixels.float() / 255 - MEAN) / STD).permute(0, 3, 1, 2)
    tokenizer = _cls("PreTrainedTokenizerFast")(
        tokenizer_file=str(pair.folder / "tokenizer.json"), pad_token="<pad>"
    )
    out = pair.clip(**tokenizer(captions, padding=True, return_tensors="pt"), pixel_values=pixels)
    return out.image_embeds, out.text_embeds
