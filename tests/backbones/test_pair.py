"""A frozen image-text pair from a transformers CLIP or SigLIP folder (tiny, random, saved
offline): each side gives transformers' own embeddings within 1e-5, the text side through
transformers' tokenizer built from the same tokenizer.json; the pair's scale is its own."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.hf_models import SIZE, TINY_VIT, _cls
from tests.helpers.pair_models import CAPTIONS, LENGTH, save_clip, save_siglip
from threetowers.backbones.hf import HFTowerError
from threetowers.backbones.pair import load_transformers_pair

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
