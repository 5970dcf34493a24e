"""What ``threetowers embed`` is asked wrongly ends as a user error (one line, exit 2); a
frozen pair's part of its vectors is the pair's own score."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.pair_models import CAPTIONS
from tests.helpers.pair_parts import own_embeddings, pair_model, square_images
from threetowers.apps.embed import caption_lines, embed, parse_alpha, save_embeddings
from threetowers.errors import UserError
from threetowers.evaluation.embedding import embed_images, embed_texts


def test_wrong_embed_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="give exactly one of --images DIR or --texts FILE"):
        embed(None, None)
    with pytest.raises(UserError, match="--alpha 'half': give a number in"):
        parse_alpha("half")
    with pytest.raises(ValueError, match="--alpha 'f=x'"):  # the server answers it with a 400
        parse_alpha("f=x")
    blank = tmp_path / "captions.txt"
    blank.write_text("\n  \n")
    with pytest.raises(UserError, match="holds no captions"):
        caption_lines(blank, max_bad_fraction=0.0)
    with pytest.raises(UserError, match="must end in .safetensors or .npy"):
        save_embeddings(tmp_path / "vectors.txt", torch.zeros(1, 2), ["a"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    built = pair_model(root / "clip")
    paths = square_images(root / "images", 5)
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return built, paths, root


def test_all_weight_on_a_pair_gives_its_own_cosine_similarities(pair):
    """``embed --alpha t=1``: image and caption vectors whose dot products are the pair's
    own scores (transformers'), in the parts' concatenation (16-wide parts, the pair's 8)."""
    built, paths, root = pair
    own_images, own_texts = own_embeddings(built, paths, CAPTIONS)
    images, image_keys = embed(
        built.model, built.tokenizer, images=root / "images", alpha=parse_alpha("t=1")
    )
    texts, text_keys = embed(
        built.model, built.tokenizer, texts=root / "captions.txt", alpha=parse_alpha("t=1")
    )
    assert image_keys == [path.name for path in paths] and text_keys == CAPTIONS
    assert images.shape == (5, 4 * 16 + 8) and texts.shape == (4, 4 * 16 + 8)
    torch.testing.assert_close(images @ texts.T, own_images @ own_texts.T, atol=1e-5, rtol=0)


def test_a_mixture_with_a_pair_is_its_weighted_scores(pair):
    built, paths, root = pair
    own_images, own_texts = own_embeddings(built, paths, CAPTIONS)
    weights = parse_alpha("f=0.5,h=0.2,t=0.3")
    images, _ = embed(built.model, built.tokenizer, images=root / "images", alpha=weights)
    texts, _ = embed(built.model, built.tokenizer, texts=root / "captions.txt", alpha=weights)
    parts = embed_images(built.model, paths)
    words = embed_texts(built.model, built.tokenizer, CAPTIONS)
    expected = (
        0.5 * parts["z_f"] @ words["z_g"].T
        + 0.2 * parts["z_h"] @ words["z_gh"].T
        + 0.3 * own_images @ own_texts.T
    )
    torch.testing.assert_close(images @ texts.T, expected, atol=1e-5, rtol=0)
