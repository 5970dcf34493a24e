"""A frozen image-text pair from a transformers CLIP or SigLIP folder (tiny, random, saved
offline): each side gives transformers' own embeddings within 1e-5, the text side through
transformers' tokenizer built from the same tokenizer.json; the pair's scale is its own."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from tests.helpers.hf_models import (
    SIZE,
    TINY_VIT,
    _cls,
    write_clip_preprocessor,
    write_siglip_preprocessor,
)
from threetowers.backbones.hf import HFTowerError
from threetowers.backbones.pair import load_transformers_pair

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


SAVERS = {  # the saver, the pair's scale, how transformers pads its captions
    "clip": (save_clip, math.exp(3.0), {"padding": True}),
    "siglip": (save_siglip, 5.0, {"padding": "max_length", "max_length": LENGTH}),
}


@pytest.mark.parametrize("kind", SAVERS)
def test_each_side_gives_transformers_own_embeddings(tmp_path, kind):
    save, scale, padding = SAVERS[kind]
    model = save(tmp_path)
    pair = load_transformers_pair(tmp_path)
    tokenizer = _cls("PreTrainedTokenizerFast")(
        tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>"
    )
    inputs = tokenizer(CAPTIONS, **padding, return_tensors="pt")
    if kind == "siglip":
        inputs.pop("attention_mask")  # SigLIP is called without one
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(**inputs, pixel_values=images)
    normalise = torch.nn.functional.normalize
    torch.testing.assert_close(
        normalise(pair.image(images), dim=-1), out.image_embeds, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        normalise(pair.text(CAPTIONS), dim=-1), out.text_embeds, rtol=1e-5, atol=1e-5
    )
    assert pair.image.feature_dim == pair.text.feature_dim == out.text_embeds.shape[1]
    assert pair.scale == pytest.approx(scale, rel=1e-6)
    assert pair.image.preprocessing.image_size == SIZE
    # the sides' cache names differ from each other and from a plain tower of the folder
    assert pair.image.digest() != pair.text.digest()


def test_a_model_that_is_not_a_pair_is_refused(tmp_path):
    _cls("ViTModel")(_cls("ViTConfig")(**TINY_VIT)).save_pretrained(tmp_path)
    with pytest.raises(HFTowerError, match="a frozen pair is a CLIP or SigLIP model"):
        load_transformers_pair(tmp_path)


def test_a_pair_without_its_tokenizer_is_refused(tmp_path):
    save_clip(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(HFTowerError, match="has no tokenizer.json"):
        load_transformers_pair(tmp_path)
