"""The image tower f."""

from __future__ import annotations

import pytest
import torch

import threetowers as tt
from threetowers.towers.vit import VisionTransformer


def test_vit_b16_encoder_has_the_known_parameter_count():
    # ViT-B/16 at 224 px with a class token, no classifier: 85.8M parameters.
    with torch.device("meta"):
        vit = VisionTransformer(224, 16, 768, 12, 12, 4.0, pool="cls")
    count = sum(p.numel() for p in vit.parameters())
    assert abs(count - 85.8e6) / 85.8e6 < 0.01, count


@pytest.mark.parametrize("preset", ["b16", "l16", "g14"])
def test_paper_scale_presets_construct(preset):
    model = tt.build_model(tt.load_config(preset, ["model.mode=clip"]), device="meta")
    expected = {"b16": 85.8e6, "l16": 303.3e6, "g14": 1011e6}[preset]
    count = sum(p.numel() for p in model.image_tower.parameters())
    assert abs(count - expected) / expected < 0.01, count


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_pools_give_width_features_and_gradients(pool):
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 32, 2, 4, pool=pool)
    images = torch.randn(3, 3, 32, 32)
    features = vit(images)
    assert features.shape == (3, 32)
    features.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vit.parameters())
    assert (vit.cls_token is not None) == (pool == "cls")


def test_gap_with_a_class_token_attends_to_it_but_leaves_it_out_of_the_mean():
    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, 16, 1, 2, pool="gap", class_token=True).double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), vit._patchify(images)], dim=1)
    tokens = vit.norm(vit.encoder(tokens + vit.pos_embed))
    torch.testing.assert_close(vit(images), tokens[:, 1:].mean(dim=1))
    assert vit.pos_embed.shape[1] == 4 + 1
    # The class token changes the patches' features through attention: another tower.
    with torch.no_grad():
        vit.cls_token.add_(torch.randn_like(vit.cls_token))
    assert not torch.allclose(vit(images), tokens[:, 1:].mean(dim=1))


def test_class_token_goes_only_with_pools_that_can_use_it():
    # one check, one message, from Python and from a config
    with pytest.raises(ValueError, match="only gap takes either"):
        VisionTransformer(16, 8, 16, 1, 2, pool="cls", class_token=False)
    with pytest.raises(ValueError, match="only gap takes either"):
        VisionTransformer(16, 8, 16, 1, 2, pool="map", class_token=True)
    with pytest.raises(tt.ConfigError, match="only gap takes either"):
        tt.load_config("tiny", ["model.image.pool=map", "model.image.class_token=true"])


def test_images_do_not_interact_within_a_batch():
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 32, 2, 4, pool="gap").eval()
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(vit(images)[1:2], vit(images[1:2]), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        VisionTransformer(30, 8, 32, 1, 4)
    with pytest.raises(ValueError, match="image pool must be one of"):
        VisionTransformer(32, 8, 32, 1, 4, pool="max")


def test_patchify_is_the_patch_convolution():
    # The matmul over flattened patches must equal the strided convolution whose weights it
    # reads (float64), so checkpoints and the usual ViT layout stay valid.
    torch.manual_seed(0)
    vit = VisionTransformer(12, 4, 8, 1, 2).double()
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    by_conv = vit.patch_embed(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(vit._patchify(images), by_conv, rtol=1e-12, atol=1e-12)
