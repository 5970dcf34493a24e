"""backbones/frozen.py: the freeze contract of FrozenBackbone (no parameter trains, eval mode
whatever train() is told, features computed without autograd yet consumable by a trainable
head), its digest, and Preprocessing: its checks and the one normalisation, against the
direct formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from threetowers.backbones.frozen import IMAGENET_MEAN, IMAGENET_STD, FrozenBackbone, Preprocessing


def conv_net() -> nn.Module:
    """BatchNorm and dropout: what a tower left in train mode would get wrong."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture
def frozen() -> FrozenBackbone:
    return FrozenBackbone(conv_net(), Preprocessing(16), name="net")


def test_no_parameter_trains_and_a_trainable_head_on_its_features_does(frozen):
    head = nn.Linear(frozen.feature_dim, 4)
    model = nn.ModuleDict({"h": frozen, "head": head})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(head.weight), id(head.bias)}
    with torch.enable_grad():
        features = frozen(torch.randn(3, 3, 16, 16))
        assert not features.requires_grad and not features.is_inference()
        features.mul_(2.0)  # an ordinary tensor: in-place use outside inference mode works
        head(features).square().sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())


def test_it_stays_in_eval_mode_and_its_statistics_never_move(frozen):
    model = nn.Sequential(frozen, nn.Linear(frozen.feature_dim, 2))
    model.train()  # a parent's train() reaches the backbone's own
    assert model[1].training and not frozen.training
    assert not any(m.training for m in frozen.modules())
    frozen.train(True)
    assert not frozen.training
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    images = torch.randn(4, 3, 16, 16)
    first = frozen(images)
    assert torch.equal(first, frozen(images))  # dropout off: the same features twice
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_features_are_the_modules_eval_features_and_their_dim_is_measured(frozen):
    net = conv_net().eval()
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(frozen(images), net(images))
    assert frozen.feature_dim == 6
    assert FrozenBackbone(conv_net(), Preprocessing(16), feature_dim=6).feature_dim == 6


def test_a_tower_built_on_the_meta_device_needs_its_dim_given():
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="give feature_dim for third tower 'meta_net'"):
        FrozenBackbone(net, Preprocessing(8), name="meta_net")
    assert FrozenBackbone(net, Preprocessing(8), feature_dim=4).feature_dim == 4


def test_the_digest_names_weights_and_preprocessing_and_nothing_else(frozen):
    same = FrozenBackbone(conv_net(), Preprocessing(16), name="another name")
    assert same.digest() == frozen.digest()
    frozen.train()
    frozen(torch.randn(2, 3, 16, 16))
    assert frozen.digest() == same.digest()  # neither a forward nor train() changes it
    other_size = FrozenBackbone(conv_net(), Preprocessing(24))
    other_crop = FrozenBackbone(conv_net(), Preprocessing(16, crop_fraction=1.0))
    nudged = FrozenBackbone(conv_net(), Preprocessing(16))
    with torch.no_grad():
        nudged.module[0].weight[0, 0, 0, 0] += 1e-3
    statistics = FrozenBackbone(conv_net(), Preprocessing(16))
    statistics.module[1].running_var[0] += 1e-3  # a buffer: the features depend on it too
    digests = {b.digest() for b in (frozen, other_size, other_crop, nudged, statistics)}
    assert len(digests) == 5


def test_normalize_is_per_channel_mean_and_std():
    pre = Preprocessing(8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    images = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    got = pre.normalize(images)
    for c in range(3):
        want = (images[:, c] - pre.mean[c]) / pre.std[c]
        assert torch.allclose(got[:, c], want, rtol=0, atol=1e-15)
    assert got.dtype == torch.float64
    assert torch.equal(pre.normalize(images[0]), got[0])  # one image (3, H, W) alike


def test_normalize_pixels_is_normalize_of_the_pixels_over_255_bit_for_bit():
    pre = Preprocessing(8)
    pixels = torch.randint(0, 256, (3, 3, 7, 7), dtype=torch.uint8)
    pixels[0, :, 0, 0] = 0
    pixels[0, :, 0, 1] = 255
    got = pre.normalize_pixels(pixels)
    assert got.dtype == torch.float32 and pixels.dtype == torch.uint8
    assert torch.equal(got, pre.normalize(pixels.to(torch.float32) / 255.0))
    assert torch.equal(pre.normalize_pixels(pixels[1]), got[1])
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(got[0, :, 0, 0], -mean / std) and torch.allclose(
        got[0, :, 0, 1], (1 - mean) / std
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_size": 0}, "image_size must be positive, got 0"),
        ({"mean": (0.5, 0.5)}, "three means and three positive stds"),
        ({"std": (0.5, 0.0, 0.5)}, "three means and three positive stds"),
        ({"resize": "lanczos"}, "resize must be one of"),
        ({"crop_fraction": 0.0}, r"crop_fraction must be in \(0, 1\], got 0.0"),
        ({"crop_fraction": 1.5}, r"crop_fraction must be in \(0, 1\], got 1.5"),
    ],
)
def test_preprocessing_refuses_what_no_backbone_could_mean(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**({"image_size": 8} | kwargs))


def test_preprocessing_is_a_value():
    pre = Preprocessing(32, mean=[0, 0, 1], std=[1, 2, 3], resize="bilinear")
    assert pre.mean == (0.0, 0.0, 1.0) and pre.std == (1.0, 2.0, 3.0)
    assert Preprocessing(**pre.to_dict()) == pre
    assert hash(Preprocessing(**pre.to_dict())) == hash(pre)
    assert pre.to_dict() == {
        "image_size": 32,
        "mean": (0.0, 0.0, 1.0),
        "std": (1.0, 2.0, 3.0),
        "resize": "bilinear",
        "crop_fraction": 0.875,
    }
