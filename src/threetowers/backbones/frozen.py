"""A frozen pretrained image backbone: the third tower h (and LiT's image tower).

Frozen means four things, all enforced here rather than left to the caller: no parameter
requires a gradient (so none reaches an optimizer built from trainable parameters), the
module stays in eval mode whatever ``train()`` is called with (BatchNorm statistics and
dropout never move), and the forward runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from threetowers.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("bicubic", "bilinear", "nearest")


class PreprocessingError(UserError, ValueError):
    """Preprocessing a backbone declares (e.g. in a model folder's preprocessor_config.json)
    that cannot be applied."""


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its images: every tower declares its own.

    Images are resized so the shorter side is ``image_size / crop_fraction`` (with
    ``resize`` interpolation), centre-cropped to ``image_size``, scaled to [0, 1] and
    normalised with ``mean`` / ``std`` per RGB channel.
    """

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bicubic"
    crop_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise PreprocessingError(
                f"Preprocessing.image_size must be positive, got {self.image_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PreprocessingError(
                f"Preprocessing needs three means and three positive stds, got "
                f"mean={self.mean} std={self.std}"
            )
        if self.resize not in RESIZE_MODES:
            raise PreprocessingError(
                f"Preprocessing.resize must be one of {RESIZE_MODES}, got {self.resize!r}"
            )
        if not 0 < self.crop_fraction <= 1:
            raise PreprocessingError(
                f"Preprocessing.crop_fraction must be in (0, 1], got {self.crop_fraction}"
            )
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        return asdict(self)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images, (3, H, W) or (B, 3, H, W), normalised with these statistics: the
        one implementation, per image in the transforms and per batch in the loader."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
        return (images - mean) / std

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (3, S, S) or (B, 3, S, S) -> normalised float32: ``normalize``'s
        operations in place on one new buffer, bit for bit its result at a third of the time
        (a batch's float copy overflows the caches, so every extra buffer costs page faults)."""
        mean, std = _channels(self.mean, pixels.device), _channels(self.std, pixels.device)
        return pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)


@functools.lru_cache(maxsize=64)
def _channels(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-channel statistics on ``device``, made once: a new tensor on a GPU is a copy that
    waits for the host, at every batch."""
    return torch.tensor(values, device=device).view(3, 1, 1)


# On CPU a convolutional tower runs fastest on about this many pixels at a time: a whole
# batch's activations overflow the caches, and each fresh multi-GB buffer costs page faults.
# Measured on 2 cores: EfficientNet-Lite0 1.5x (64 px) to 1.9x (224 px) faster, bit for bit
# the same features (in eval mode every image is computed on its own anyway).
CPU_CHUNK_PIXELS = 2**18


def _chunk(images: torch.Tensor) -> int:
    return max(1, CPU_CHUNK_PIXELS // (images.shape[-1] * images.shape[-2]))


class FrozenBackbone(nn.Module):
    """Wraps any module mapping normalised images (B, 3, S, S) to pooled features (B, C).

    ``feature_dim`` is measured with one dummy forward when not given. ``channels_last``
    runs a convolutional module in NHWC layout, which oneDNN's CPU kernels prefer (the bundled
    EfficientNet-Lite0 runs about 2x faster), and on CPU in micro-batches of about
    ``CPU_CHUNK_PIXELS``; leave it off for attention-only modules.
    """

    def __init__(
        self,
        module: nn.Module,
        preprocessing: Preprocessing,
        feature_dim: int | None = None,
        name: str = "custom",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.module = module.to(memory_format=torch.channels_last) if channels_last else module
        self.preprocessing = preprocessing
        self.name = name
        for param in self.module.parameters():
            param.requires_grad_(False)
        super().train(False)
        self.feature_dim = feature_dim if feature_dim is not None else self._measure_feature_dim()

    def train(self, mode: bool = True) -> FrozenBackbone:
        # Frozen towers never leave eval mode: BatchNorm statistics and dropout stay fixed.
        return super().train(False)

    def digest(self) -> str:
        """Its weights and preprocessing: what its features depend on (cache names).
        Checkpoints record it and a resume compares: what it covers changes only with a
        migration of the recorded digests."""
        digest = hashlib.sha256(json.dumps(self.preprocessing.to_dict()).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.channels_last and images.device.type == "cpu":
                features = torch.cat([self.module(part) for part in images.split(_chunk(images))])
            else:
                features = self.module(images)
        if features.ndim != 2:
            raise ValueError(
                f"third tower {self.name!r} returned features of shape {tuple(features.shape)}; "
                "it must return pooled (batch, dim) features"
            )
        # Inference tensors cannot enter autograd; a clone (B x C, cheap) turns them into
        # ordinary constants that the trainable head on h can consume.
        return features.clone()

    def _measure_feature_dim(self) -> int:
        param = next(self.module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if device.type == "meta":
            raise ValueError(
                f"give feature_dim for third tower {self.name!r} built on the meta device"
            )
        size = self.preprocessing.image_size
        probe = torch.zeros(1, 3, size, size, device=device)
        return int(self(probe).shape[-1])
