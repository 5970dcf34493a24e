"""apps/search/parts.py: an index row is its parts concatenated unweighted, a query its parts
times the mixture weights, so that their inner product is the convex combination
Σ_p a_p ⟨x_p, y_p⟩ at any weights (float64 reference), with parts of one width or a frozen
pair's own; the weights recall is measured at."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.pair_parts import pair_model
from threetowers.apps.search.parts import Parts, weighted

NAMES = ("f", "h", "minilm")
DIM = 5
MIXED = (5, 5, 3)  # the last part a frozen pair's own, of its own width


def parts(dims: tuple[int, ...] = (DIM,) * 3) -> Parts:
    return Parts(NAMES, ("z_f", "z_h", "z_m"), ("z_g", "z_gh", "z_gm"), dims)


def embeddings(p: Parts, side: str, rows: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = p.image if side == "image" else p.text
    dims = zip(keys, p.dims, strict=True)
    return {key: torch.randn(rows, dim, generator=generator) for key, dim in dims}


@pytest.mark.parametrize("dims", [(DIM,) * 3, MIXED], ids=["one width", "mixed widths"])
@pytest.mark.parametrize(
    "weights",
    [{"f": 1.0}, {"f": 0.2, "h": 0.8}, {"f": 0.5, "h": 0.25, "minilm": 0.25}, {"minilm": 1.0}],
)
def test_a_weighted_query_scores_every_row_by_the_convex_combination(weights, dims):
    p = parts(dims)
    images = embeddings(p, "image", 7, seed=0)
    texts = embeddings(p, "text", 3, seed=1)
    rows = p.row(images, "image")
    queries = p.weighted(p.row(texts, "text"), weights)
    scores = queries.astype(np.float64) @ rows.astype(np.float64).T
    expected = sum(
        weights.get(name, 0.0) * (texts[t].double() @ images[i].double().T).numpy()
        for name, i, t in zip(p.names, p.image, p.text, strict=True)
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert queries.dtype == np.float32 and rows.dtype == np.float32


def test_a_row_is_its_sides_parts_in_order_unweighted():
    p = parts()
    images = embeddings(p, "image", 2, seed=2)
    rows = p.row(images | {"z_g": torch.zeros(2, DIM)}, "image")
    assert rows.shape == (2, 3 * DIM)
    for number, key in enumerate(p.image):
        assert np.array_equal(rows[:, number * DIM : (number + 1) * DIM], images[key].numpy())
    half = {k: v.half() for k, v in images.items()}  # any float dtype comes out float32
    assert p.row(half, "image").dtype == np.float32


def test_a_part_without_a_weight_counts_zero_and_the_rows_are_not_changed():
    rows = np.arange(2 * 3 * DIM, dtype=np.float64).reshape(2, 3 * DIM)
    original = rows.copy()
    out = weighted(rows, NAMES, (DIM,) * 3, {"h": 2.0})
    assert np.array_equal(rows, original)
    assert np.array_equal(out[:, :DIM], np.zeros((2, DIM)))
    assert np.array_equal(out[:, DIM : 2 * DIM], 2.0 * original[:, DIM : 2 * DIM])
    assert np.array_equal(out[:, 2 * DIM :], np.zeros((2, DIM)))


def test_recall_is_measured_at_the_main_pair_an_even_mix_and_each_tower_alone():
    assert parts().sample_weights() == [
        {"f": 1.0},
        {"f": 1 / 3, "h": 1 / 3, "minilm": 1 / 3},
        {"h": 1.0},
        {"minilm": 1.0},
    ]
    single = Parts(("f",), ("z_f",), ("z_g",), (DIM,))
    assert not single.mixes and single.sample_weights() == [{"f": 1.0}]
    assert parts().mixes


def test_a_frozen_pairs_part_is_its_own_embeddings_at_its_own_width(tmp_path):
    p = Parts.of(pair_model(tmp_path).model)
    assert p.names == ("f", "h", "timg", "ttxt", "t")
    assert p.image == ("z_f", "z_h", "z_timg", "z_fttxt", "u_timg")
    assert p.text == ("z_g", "z_gh", "z_gtimg", "z_ttxt", "u_ttxt")
    assert p.dims == (16, 16, 16, 16, 8) and p.dim == 16 and p.width == 72
    rows = np.ones((1, 72), np.float32)
    query = p.weighted(rows, {"f": 0.25, "t": 0.75})
    expected = np.concatenate([np.full(16, 0.25), np.zeros(48), np.full(8, 0.75)])
    np.testing.assert_array_equal(query[0], expected.astype(np.float32))
