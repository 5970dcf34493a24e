"""apps/analysis/cka.py: linear CKA equals its definition through Gram matrices (float64),
with its invariances (isotropic scaling, rotation, translation) and symmetry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.cka import cka_by_definition
from threetowers.apps.analysis.cka import linear_cka


def test_linear_cka_equals_its_definition_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    y = x[:, :5] @ rng.normal(size=(5, 4)) + 0.5 * rng.normal(size=(60, 4))
    got = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert got == pytest.approx(cka_by_definition(x, y), rel=1e-5)
    xt = torch.tensor(x)
    rotation, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert linear_cka(xt, xt) == pytest.approx(1.0)
    assert linear_cka(xt, 3.0 * xt @ torch.tensor(rotation) + 2.0) == pytest.approx(1.0)
    unrelated = linear_cka(xt, torch.tensor(rng.normal(size=(60, 7))))
    assert unrelated < 0.3
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(xt, xt[:10])


@pytest.mark.parametrize("n,d1,d2", [(5, 12, 3), (40, 3, 16), (200, 8, 8)])
def test_wide_and_tall_embeddings_match_the_definition_and_are_symmetric(n, d1, d2):
    """More features than samples too: the feature-space form is exact at any shape."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d1))
    y = np.tanh(x @ rng.normal(size=(d1, d2))) + 0.3 * rng.normal(size=(n, d2))
    got = linear_cka(torch.tensor(x), torch.tensor(y))
    assert got == pytest.approx(cka_by_definition(x, y), rel=1e-10)
    assert linear_cka(torch.tensor(y), torch.tensor(x)) == pytest.approx(got, rel=1e-12)
    assert 0.0 <= got <= 1.0


def test_float16_embeddings_far_from_the_origin_are_centred_in_float64():
    """Embeddings with a large shared offset: centring in their own float16 would lose them."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6))
    y = x @ rng.normal(size=(6, 6)) + rng.normal(size=(50, 6))
    x16 = torch.tensor(x, dtype=torch.float16)
    y16 = torch.tensor(y, dtype=torch.float16)
    reference = cka_by_definition(x16.double().numpy(), y16.double().numpy())
    assert linear_cka(x16, y16) == pytest.approx(reference, rel=1e-9)
    offset = torch.tensor(x * 1e-3 + 1.0)  # float64: offset 1, spread 1e-3
    assert linear_cka(offset, torch.tensor(y)) == pytest.approx(cka_by_definition(x, y), rel=1e-8)


def test_anisotropic_scaling_changes_it():
    """Not invariant to any invertible map: only to rotations and isotropic scaling."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 4))
    y = x + 0.5 * rng.normal(size=(80, 4))
    stretched = x * np.array([10.0, 1.0, 1.0, 0.1])
    xt, yt = torch.tensor(x), torch.tensor(y)
    assert linear_cka(torch.tensor(stretched), yt) == pytest.approx(
        cka_by_definition(stretched, y), rel=1e-10
    )
    assert abs(linear_cka(torch.tensor(stretched), yt) - linear_cka(xt, yt)) > 0.05
