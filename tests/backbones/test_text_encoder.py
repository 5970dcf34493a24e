"""Frozen text encoders: the packaged MiniLM gives sentence-transformers' own embeddings, a
plain transformers folder pools by the mean, and the tower is frozen."""

from __future__ import annotations

import shutil

import pytest
import torch

from threetowers.backbones.text_encoder import load_text_encoder, minilm_path
from threetowers.errors import UserError

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "a photo of a small red ring on the left, next to a big blue square and a tree",
    "Hoop.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder()


def test_minilm_gives_sentence_transformers_own_embeddings(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    got = minilm(SENTENCES)
    assert got.shape == (5, 384) and minilm.feature_dim == 384
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    ids = reference.tokenize(SENTENCES)["input_ids"]
    assert torch.equal(minilm.tokenize(SENTENCES)["input_ids"], ids)


def test_minilm_ranks_the_model_cards_pairs(minilm):
    eating, bread, horse = minilm(SENTENCES[:3])
    assert eating @ bread > 0.7 > 0.3 > eating @ horse  # 0.755 and 0.247 in float32


def test_a_caption_does_not_depend_on_its_batch(minilm):
    alone = torch.cat([minilm([sentence]) for sentence in SENTENCES])
    torch.testing.assert_close(minilm(SENTENCES), alone, rtol=0, atol=2e-6)


def test_the_encoder_is_frozen(minilm):
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    assert torch.equal(minilm(SENTENCES[:2]), minilm(SENTENCES[:2]))  # dropout stays off


def test_a_plain_transformers_folder_pools_by_the_mean(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path)
    shutil.copy(minilm_path() / "tokenizer.json", tmp_path / "tokenizer.json")
    encoder = load_text_encoder(tmp_path)
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("mean", False, 64)
    inputs = encoder.tokenize(SENTENCES[:2])
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state.double()
    mask = inputs["attention_mask"].double()[..., None]
    expected = (hidden * mask).sum(1) / mask.sum(1)  # float64, by the formula
    torch.testing.assert_close(encoder(SENTENCES[:2]).double(), expected, rtol=0, atol=1e-5)


def test_a_folder_without_model_or_tokenizer_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_text_encoder(tmp_path)


def test_a_pooling_other_than_mean_or_cls_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    shutil.copy(minilm_path() / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    with pytest.raises(UserError, match="only mean or cls pooling are supported"):
        load_text_encoder(tmp_path)
