"""A frozen pair in a model: its sides' own embeddings (u), its distillation term with the
pair's own scale, and its own score as a part of the convex combination."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import threetowers as tt
from tests.conftest import tiny_backbone, tiny_batch
from tests.helpers.pair_models import CAPTIONS, save_clip
from threetowers.backbones.pair import FrozenPair, load_transformers_pair
from threetowers.errors import UserError
from threetowers.model.losses import distillation_term
from threetowers.model.three_towers import batch_embeddings
from threetowers.trainer.accumulation import backward_in_micro_batches


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    save_clip(folder)
    return folder


def pair_config(folder, *overrides):
    return tt.load_config(
        "tiny",
        [
            "model.embed_dim=16",
            "model.frozen.1.name=t",
            "model.frozen.1.backbone=pair",
            f"model.frozen.1.path={folder}",
            *overrides,
        ],
    )


def pair_model(folder, *overrides):
    torch.manual_seed(0)
    return tt.build_model(pair_config(folder, *overrides), frozen={"h": tiny_backbone()})


def test_the_distillation_term_is_the_pairs_in_batch_kl_at_its_own_scale(clip_folder):
    model = pair_model(clip_folder, "model.frozen.1.distill_weight=0.5")
    images, tokens = tiny_batch(batch=len(CAPTIONS))
    out = model(images, tokens, captions=CAPTIONS)
    _, logs = model.loss(out)
    pair = load_transformers_pair(clip_folder)
    assert model.loss_fn.teacher_scales == {"fg_t": pytest.approx(math.exp(3.0))}
    with torch.no_grad():  # the teacher's side: the pair's own embeddings, normalised
        u = F.normalize(pair.image(model._frozen_view(pair.image.preprocessing, images)), dim=-1)
        v = F.normalize(pair.text(CAPTIONS), dim=-1)
    torch.testing.assert_close(out["u_timg"], u)
    torch.testing.assert_close(out["u_ttxt"], v)
    z_f, z_g = out["z_f"], out["z_g"]
    scale = model.loss_fn.scale("fg_t")
    expected = distillation_term(z_f, z_g, z_f, z_g, u, v, u, v, scale, math.exp(3.0))
    torch.testing.assert_close(logs["loss/fg_t"], expected.detach())
    assert model.loss_fn.weights["fg_t"] == 0.5


def test_the_pairs_own_score_is_a_part_of_the_combination(clip_folder):
    model = pair_model(clip_folder).eval()
    images, tokens = tiny_batch(batch=len(CAPTIONS))
    with torch.no_grad():
        out = model(images, tokens, captions=CAPTIONS)
        own = (
            model.encode_image(images, {"t": 1.0})
            @ model.encode_text(tokens, {"t": 1.0}, captions=CAPTIONS).T
        )
        half = (
            model.encode_image(images, {"f": 0.5, "t": 0.5})
            @ model.encode_text(tokens, {"f": 0.5, "t": 0.5}, captions=CAPTIONS).T
        )
    torch.testing.assert_close(own, out["u_timg"] @ out["u_ttxt"].T)
    main = out["z_f"] @ out["z_g"].T
    torch.testing.assert_close(half, 0.5 * main + 0.5 * own)
    assert model.part_dims() == {"f": 16, "h": 16, "timg": 16, "ttxt": 16, "t": 8}


def test_a_pair_given_from_python_replaces_the_configured_one(clip_folder):
    pair = load_transformers_pair(clip_folder)
    given = FrozenPair(pair.image, pair.text, 2.0)
    cfg = pair_config("/nowhere")  # never loaded: the given pair stands in
    model = tt.build_model(cfg, frozen={"h": tiny_backbone(), "t": given})
    assert model.frozen["timg"] is pair.image and model.frozen["ttxt"] is pair.text
    assert model.loss_fn.teacher_scales == {"fg_t": 2.0}
    with pytest.raises(tt.ConfigError, match="frozen tower 't' must be a FrozenPair"):
        tt.build_model(cfg, frozen={"h": tiny_backbone(), "t": tiny_backbone()})


def test_a_pair_whose_sides_do_not_share_a_space_is_refused(clip_folder):
    pair = load_transformers_pair(clip_folder)
    other = FrozenPair(tiny_backbone(), pair.text, 1.0)  # 24-dim images, 8-dim captions
    with pytest.raises(ValueError, match="sides must share a space.* 24 dims .* text side 8"):
        tt.build_model(pair_config(clip_folder), frozen={"h": tiny_backbone(), "t": other})


def test_a_missing_pair_folder_is_named_before_training(tmp_path):
    with pytest.raises(UserError, match=f"frozen pair {tmp_path / 'none'} is not a folder"):
        tt.build_model(pair_config(tmp_path / "none"), frozen={"h": tiny_backbone()})


@pytest.mark.parametrize("block", [0, 3])
def test_micro_batches_give_the_whole_batchs_gradients_with_a_pair(clip_folder, block):
    """The distillation term is exact under accumulation (float64; the sides' features
    given as their caches give them)."""
    model = pair_model(clip_folder, f"loss.block_size={block}").double()
    images, tokens = tiny_batch(batch=len(CAPTIONS))
    with torch.no_grad():
        view = model._frozen_view(model.frozen["timg"].preprocessing, images.double())
        given = {
            "timg": model.frozen["timg"].float()(view.float()).double(),
            "ttxt": model.frozen["ttxt"].float()(CAPTIONS).double(),
        }
    tensors = {
        "images": images.double(),
        "tokens": tokens,
        "captions": CAPTIONS,
        "frozen_features": given,
    }

    def gradients(micro_batch):
        model.zero_grad(set_to_none=True)
        if micro_batch:
            backward_in_micro_batches(
                model, model, tensors, [len(CAPTIONS)], micro_batch, nullcontext
            )
        else:
            loss, _ = model.loss(batch_embeddings(model, tensors))
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, micro = gradients(0), gradients(1)
    assert "loss_fn.log_scale.fg_t" in whole and whole.keys() == micro.keys()
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_side_read_by_two_parts_runs_once(clip_folder, monkeypatch):
    model = pair_model(clip_folder).eval()
    images, tokens = tiny_batch(batch=len(CAPTIONS))
    calls = []
    for side in ("timg", "ttxt"):
        tower = model.frozen[side]
        monkeypatch.setattr(tower, "forward", lambda x, f=tower.forward: calls.append(1) or f(x))
    weights = {"timg": 0.2, "ttxt": 0.3, "t": 0.5}
    with torch.no_grad():
        image = model.encode_image(images, weights)
        text = model.encode_text(tokens, weights, captions=CAPTIONS)
        out = model(images, tokens, captions=CAPTIONS)
    assert len(calls) == 2 + 2  # once each in encode_image / encode_text, once each in forward
    expected = (
        0.2 * out["z_timg"] @ out["z_gtimg"].T
        + 0.3 * out["z_fttxt"] @ out["z_ttxt"].T
        + 0.5 * out["u_timg"] @ out["u_ttxt"].T
    )
    torch.testing.assert_close(image @ text.T, expected)
