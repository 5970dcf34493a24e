"""Losses against an independent float64 implementation written from METHOD.md's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import terms_of, tiny_batch, tiny_model
from tests.helpers.reference_losses import reference_softmax
from threetowers.model.losses import ThreeTowersLoss

TERM_PAIRS = {
    "clip": {"f_g": ("z_f", "z_g")},
    "lit": {"h_g": ("z_h", "z_g")},
    "3t": {"f_g": ("z_f", "z_g"), "fh_h": ("z_fh", "z_h"), "gh_h": ("z_gh", "z_h")},
}


def reference_sigmoid(a, b, s, beta):
    """−mean_ij log σ(y_ij (s aᵢ·bⱼ + β)), written with log σ(x) = −log(1 + e^{−x})."""
    n = a.shape[0]
    y = 2 * torch.eye(n, dtype=a.dtype) - 1
    return torch.log1p(torch.exp(-y * (s * a @ b.T + beta))).mean()


def reference_objective(embeddings, mode, kind, log_scales, biases, weights, max_scale=100.0):
    total, weight_sum = 0.0, 0.0
    for name, (ka, kb) in TERM_PAIRS[mode].items():
        w = weights.get(name, 1.0)
        s = torch.clamp(torch.exp(log_scales[name]), max=max_scale)
        a, b = embeddings[ka], embeddings[kb]
        value = (
            reference_softmax(a, b, s)
            if kind == "softmax"
            else reference_sigmoid(a, b, s, biases[name])
        )
        total = total + w * value
        weight_sum += w
    return total / weight_sum


def random_embeddings(mode, batch=12, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = {k for pair in TERM_PAIRS[mode].values() for k in pair}
    return {
        k: F.normalize(torch.randn(batch, dim, generator=generator), dim=-1) for k in sorted(keys)
    }


@pytest.mark.parametrize("mode", ["clip", "lit", "3t"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shared", [False, True])
def test_loss_and_gradients_match_float64_reference(mode, kind, shared):
    weights = {"f_g": 2.0, "fh_h": 0.5, "gh_h": 1.0} if mode == "3t" else {}
    loss_fn = ThreeTowersLoss(
        terms_of(mode), kind=kind, weights=weights, shared_temperature=shared, init_scale=7.0
    )
    # Give every term its own scale (and bias) so that a mix-up between terms would show.
    with torch.no_grad():
        for i, p in enumerate(loss_fn.log_scale.values()):
            p.fill_(math.log(5.0 + 3 * i))
        for i, p in enumerate(loss_fn.bias.values()):
            p.fill_(-4.0 - i)
    embeddings = {k: v.requires_grad_() for k, v in random_embeddings(mode).items()}
    total, logs = loss_fn(embeddings)
    total.backward()

    ref_emb = {k: v.detach().double().requires_grad_() for k, v in embeddings.items()}
    names = [t.name for t in terms_of(mode)]
    ref_scale_params = {
        n: p.detach().double().requires_grad_() for n, p in loss_fn.log_scale.items()
    }
    ref_scales = {n: ref_scale_params[loss_fn.temperature_of[n]] for n in names}
    ref_bias_params = {n: p.detach().double().requires_grad_() for n, p in loss_fn.bias.items()}
    ref_biases = (
        {n: ref_bias_params[loss_fn.temperature_of[n]] for n in names} if kind == "sigmoid" else {}
    )
    expected = reference_objective(ref_emb, mode, kind, ref_scales, ref_biases, weights)
    expected.backward()

    assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert logs["loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    for key, emb in embeddings.items():
        torch.testing.assert_close(emb.grad.double(), ref_emb[key].grad, rtol=1e-4, atol=1e-6)
    for name, param in loss_fn.log_scale.items():
        assert param.grad.item() == pytest.approx(
            ref_scale_params[name].grad.item(), rel=1e-4, abs=1e-6
        )
    for name, param in loss_fn.bias.items():
        assert param.grad.item() == pytest.approx(
            ref_bias_params[name].grad.item(), rel=1e-4, abs=1e-6
        )
    expected_params = 1 if shared else len(names)
    assert len(loss_fn.log_scale) == expected_params
    assert len(loss_fn.bias) == (expected_params if kind == "sigmoid" else 0)


@pytest.mark.parametrize("mode", ["clip", "lit", "3t"])
def test_per_term_logs_match_reference_terms(mode):
    loss_fn = ThreeTowersLoss(terms_of(mode))
    embeddings = random_embeddings(mode, seed=3)
    _, logs = loss_fn(embeddings)
    for name, (ka, kb) in TERM_PAIRS[mode].items():
        expected = reference_softmax(embeddings[ka].double(), embeddings[kb].double(), 10.0)
        assert logs[f"loss/{name}"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert logs[f"scale/{name}"].item() == pytest.approx(10.0, rel=1e-6)


def test_scale_is_clamped_and_clamp_stops_the_gradient():
    loss_fn = ThreeTowersLoss(terms_of("clip"), max_scale=100.0)
    with torch.no_grad():
        loss_fn.log_scale["f_g"].fill_(math.log(500.0))
    embeddings = random_embeddings("clip")
    total, logs = loss_fn(embeddings)
    total.backward()
    assert logs["scale/f_g"].item() == pytest.approx(100.0)
    expected = reference_softmax(embeddings["z_f"].double(), embeddings["z_g"].double(), 100.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_fn.log_scale["f_g"].grad.item() == 0.0


def test_zero_weight_drops_term_and_l2_alignment():
    loss_fn = ThreeTowersLoss(terms_of("3t"), weights={"fh_h": 0.0}, alignment="l2")
    assert [t.name for t in loss_fn.terms] == ["f_g", "gh_h"]
    assert list(loss_fn.log_scale) == ["f_g"]  # L2 alignment has no temperature
    embeddings = random_embeddings("3t", seed=5)
    total, logs = loss_fn(embeddings)
    l2 = (embeddings["z_gh"].double() - embeddings["z_h"].double()).pow(2).sum(-1).mean()
    main = reference_softmax(embeddings["z_f"].double(), embeddings["z_g"].double(), 10.0)
    assert logs["loss/gh_h"].item() == pytest.approx(l2.item(), rel=1e-5)
    assert total.item() == pytest.approx(((main + l2) / 2).item(), rel=1e-5)


def test_invalid_loss_arguments_are_named():
    with pytest.raises(ValueError, match="unknown loss kind 'hinge'"):
        ThreeTowersLoss(terms_of("3t"), kind="hinge")
    with pytest.raises(ValueError, match="unknown loss terms"):
        ThreeTowersLoss(terms_of("3t"), weights={"f_h": 1.0})
    with pytest.raises(ValueError, match=r"every loss term \(.*\) has weight 0"):
        ThreeTowersLoss(terms_of("3t"), weights={"f_g": 0, "fh_h": 0, "gh_h": 0})


@pytest.mark.parametrize("mode", ["clip", "lit", "3t"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_model_parameter_gradients_match_float64_reference(mode, kind):
    """End to end: every trainable parameter's gradient through the towers and heads."""
    model = tiny_model(mode, f"loss.kind={kind}")
    images, tokens = tiny_batch()
    out = model(images, tokens)
    total, _ = model.loss(out)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    model.double()
    out64 = model(images.double(), tokens)
    objective = model.loss_fn
    scales = {
        t.name: objective.log_scale[objective.temperature_of[t.name]] for t in objective.terms
    }
    biases = (
        {t.name: objective.bias[objective.temperature_of[t.name]] for t in objective.terms}
        if kind == "sigmoid"
        else {}
    )
    expected = reference_objective(out64, mode, kind, scales, biases, weights={})
    expected.backward()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(
                grads[name].double(),
                param.grad,
                rtol=2e-3,
                atol=1e-6,
                msg=lambda m, n=name: f"{n}: {m}",
            )


def test_temperatures_stay_within_their_clamp_and_can_come_back():
    loss_fn = ThreeTowersLoss(terms_of("clip"), init_scale=90.0, max_scale=100.0)
    parameter = loss_fn.log_scale["f_g"]
    optimizer = torch.optim.AdamW([parameter], lr=0.5, weight_decay=0.0)
    for direction in [-1.0] * 20 + [1.0] * 20:  # push the scale up hard, then down
        optimizer.zero_grad()
        (direction * loss_fn.scale("f_g")).backward()
        optimizer.step()
        loss_fn.clamp_temperatures_()
        assert loss_fn.scale("f_g").item() <= 100.0 * (1 + 1e-6)  # float32 rounding of log(100)
        assert parameter.item() <= math.log(100.0) + 1e-6  # float32 rounding of log(100)
    # At the clamp the gradient still flows, so the scale came back down.
    assert loss_fn.scale("f_g").item() < 100.0
