"""Tiny random transformers CLIP and SigLIP pairs saved offline, with a word-level
tokenizer.json: the frozen pairs of the tests."""

from __future__ import annotations

import math

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from tests.helpers.hf_models import (
    TINY_VIT,
    _cls,
    write_clip_preprocessor,
    write_siglip_preprocessor,
)

WORDS = "a an the red green blue small big cat dog bird car house tree on in under of".split()
BOS, EOS, PAD = 0, 1, 2
LENGTH = 16  # the text towers' positions
CAPTIONS = [
    "a red cat",
    "the big blue house under a small green tree",
    "dog",
    "a bird on the car in the house of a big red dog",
]


def write_tokenizer(folder) -> None:
    """A word-level tokenizer.json with <bos>/<eos> around each caption and <pad>."""
    vocab = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD, "<unk>": 3}
    vocab |= {word: 4 + i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    tokenizer.enable_padding(pad_id=PAD, pad_token="<pad>")
    tokenizer.save(str(folder / "tokenizer.json"))


def text_config(**extra) -> dict:
    settings = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=4 + len(WORDS),
        max_position_embeddings=LENGTH,
    )
    return settings | extra


def save_clip(folder):
    torch.manual_seed(0)
    config = _cls("CLIPConfig")(
        text_config=text_config(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD),
        vision_config=TINY_VIT,
        projection_dim=8,
        logit_scale_init_value=3.0,
    )
    model = _cls("CLIPModel")(config).eval()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    write_clip_preprocessor(folder)
    return model


def save_siglip(folder):
    torch.manual_seed(0)
    config = _cls("SiglipConfig")(
        text_config=_cls("SiglipTextConfig")(**text_config()).to_dict(),
        vision_config=_cls("SiglipVisionConfig")(**TINY_VIT).to_dict(),
    )
    model = _cls("SiglipModel")(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(5.0))
    model.save_pretrained(folder)
    write_tokenizer(folder)  # padded to the longest: the pair pads SigLIP's to every position
    write_siglip_preprocessor(folder)
    return model
