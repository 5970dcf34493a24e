"""A small residual CNN: the classifier `threetowers pretrain` trains by default.

Convolutions suit the embedded world's small images and train quickly on a CPU; a ViT is the
other choice (``pretrain.architecture=vit``).
"""

from __future__ import annotations

import torch
from torch import nn

# PyTorch 2.13's CPU backward of a strided 1x1 convolution with fewer than 8 input channels
# corrupts memory (the process dies) in channels-last layout; from 8 channels up its
# gradients match a float64 reference.
CHANNELS_LAST_MIN_WIDTH = 8


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(in_channels, out_channels, stride),
            nn.ReLU(inplace=True),
            _conv_bn(out_channels, out_channels),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A stride-2 stem, one residual block per width (each after the first halves the
    resolution again), global average pooling: (B, 3, S, S) -> (B, widths[-1])."""

    def __init__(self, widths: tuple[int, ...] | list[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        widths = list(widths)
        self.feature_dim = widths[-1]
        self.stem = nn.Sequential(_conv_bn(3, widths[0], stride=2), nn.ReLU(inplace=True))
        blocks, channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(ResidualBlock(channels, width, stride=1 if i == 0 else 2))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        # Every block after the first downsamples its input (widths[:-1]) with a 1x1 shortcut.
        self.trains_channels_last = min(widths[:-1], default=CHANNELS_LAST_MIN_WIDTH) >= (
            CHANNELS_LAST_MIN_WIDTH
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(images)).mean(dim=(2, 3))
