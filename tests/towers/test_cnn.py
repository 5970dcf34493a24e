"""towers/cnn.py: SmallResNet, pretrain's default classifier, against a float64 functional
reference of its definition (stem, residual blocks with projected shortcuts where the shape
changes, global average pooling), its shapes, and when it may train in channels-last."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from threetowers.towers.cnn import SmallResNet


def randomise_batchnorms(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that each one matters."""
    generator = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def reference(state: dict, widths: list[int], images: torch.Tensor, train: bool) -> torch.Tensor:
    """SmallResNet's forward written out with torch.nn.functional, in float64."""
    s = {k: v.double() for k, v in state.items()}

    def conv_bn(x, prefix, stride, padding=1):
        x = F.conv2d(x, s[f"{prefix}.0.weight"], stride=stride, padding=padding)
        bn = f"{prefix}.1"
        return F.batch_norm(
            x, s[f"{bn}.running_mean"], s[f"{bn}.running_var"], s[f"{bn}.weight"],
            s[f"{bn}.bias"], training=train, eps=1e-5,
        )  # fmt: skip

    x = F.relu(conv_bn(images.double(), "stem.0", stride=2))
    channels = widths[0]
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        body = F.relu(conv_bn(x, f"blocks.{i}.body.0", stride))
        body = conv_bn(body, f"blocks.{i}.body.2", 1)
        if stride == 1 and channels == width:
            shortcut = x
        else:
            shortcut = conv_bn(x, f"blocks.{i}.shortcut", stride, padding=0)
        x = F.relu(body + shortcut)
        channels = width
    return x.mean(dim=(2, 3))


@pytest.mark.parametrize("widths", [[8, 16, 24], [6, 6], [12]])
@pytest.mark.parametrize("train", [False, True])
def test_forward_is_its_definition(widths, train):
    torch.manual_seed(0)
    model = SmallResNet(widths)
    randomise_batchnorms(model)
    model.train(train)
    images = torch.randn(4, 3, 20, 20)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = model(images)
    assert got.shape == (4, widths[-1]) and model.feature_dim == widths[-1]
    want = reference(state, widths, images, train)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


def test_each_block_after_the_first_halves_the_resolution():
    model = SmallResNet([8, 8, 8, 8]).eval()
    sizes = []
    model.blocks.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-2:]))
    stem = model.stem(torch.zeros(1, 3, 64, 64))
    model(torch.zeros(1, 3, 64, 64))
    assert stem.shape[-2:] == (32, 32) and sizes == [(4, 4)]  # 64 / 2 (stem) / 2 / 2 / 2


def test_channels_last_training_only_where_torch_survives_it():
    # Strided 1x1 shortcuts read widths[:-1]; the last width never enters one.
    assert SmallResNet([8, 16, 4]).trains_channels_last
    assert SmallResNet([4]).trains_channels_last
    assert not SmallResNet([8, 4, 16]).trains_channels_last


def test_channels_last_gradients_match_float64_where_it_is_allowed():
    torch.manual_seed(0)
    model = SmallResNet([8, 16])
    assert model.trains_channels_last
    double = SmallResNet([8, 16]).double()
    double.load_state_dict(model.state_dict())
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(6, 3, 16, 16)
    model(images.contiguous(memory_format=torch.channels_last)).square().sum().backward()
    double(images.double()).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), double.parameters(), strict=True):
        error = (p.grad.double() - q.grad).abs().max() / q.grad.abs().max()
        assert error < 1e-4, name
