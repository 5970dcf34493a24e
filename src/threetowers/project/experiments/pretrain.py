"""Supervised pretraining of an image classifier, saved as a third-tower checkpoint.

This makes the in-world object classifier (labels = the zero-shot classes: the JFT/ImageNet
analogue) and scene classifier (labels that ignore objects: the Places365 analogue), and
serves anyone with a labelled domain dataset in class folders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from threetowers.backbones.classifier import ARCHITECTURES, Classifier, save_classifier
from threetowers.backbones.frozen import Preprocessing
from threetowers.config import ExperimentConfig, PretrainConfig
from threetowers.data.benchmarks import ClassificationSet, load_class_folder
from threetowers.data.caches.decoded import WholeImage, image_rows
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog, Skipped
from threetowers.data.transforms import PixelEvalTransform, PixelTrainTransform
from threetowers.files.atomic import write_atomic
from threetowers.project.world.default import ensure_world
from threetowers.trainer.optim import make_optimizer

# Classifiers trained here see [-1, 1] pixels of the whole (square) image.
PRETRAIN_MEAN = PRETRAIN_STD = (0.5, 0.5, 0.5)
log = logging.getLogger(__name__)


class LabelledImages(Dataset):
    """(uint8 pixels, label); with ``augment``, a random resized crop seeded per sample. An
    image that cannot be used comes as (Skipped, label). ``images``: each image's
    :class:`WholeImage` row, decoded live or once (``image_rows``). Batch the items with
    :meth:`collate`, which normalises the batch at once as training does (``normalize_pixels``,
    the same floats): per image, normalising costs more than the crop."""

    def __init__(
        self, data: ClassificationSet, images: Dataset, pre: Preprocessing, augment=None, seed=0
    ):
        self.data, self.images = data, images
        self.view, self.augment = PixelEvalTransform(pre), augment
        self.normalise = pre.normalize_pixels
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Skipped, int]:
        label = int(self.data.labels[index])
        _, pixels = self.images[index]
        if isinstance(pixels, Skipped):
            return pixels, label
        image = WholeImage.image(pixels)
        if self.augment is None:
            return self.view(image), label
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.augment(image, rng), label

    def collate(self, items) -> tuple[torch.Tensor | None, torch.Tensor, list[Skipped]]:
        """(normalised images, labels) of the usable items, and the skipped ones."""
        used = [(pixels, label) for pixels, label in items if not isinstance(pixels, Skipped)]
        skipped = [pixels for pixels, _ in items if isinstance(pixels, Skipped)]
        images = self.normalise(torch.stack([pixels for pixels, _ in used])) if used else None
        return images, torch.tensor([label for _, label in used], dtype=torch.long), skipped


def pretraining_data(cfg: ExperimentConfig) -> tuple[ClassificationSet, ClassificationSet]:
    root = cfg.pretrain.data
    if root is None:
        world = ensure_world(cfg.data.world)
        root = str(Path(world["root"]) / f"pretrain_{cfg.pretrain.world_set}")
    return load_class_folder(root, "train"), load_class_folder(root, "val")


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Linear, loader: DataLoader, bad: BadSampleLog) -> float:
    backbone.eval()
    correct = total = 0
    for images, labels, skipped in loader:
        bad.record(len(labels), skipped)
        if images is not None:
            correct += int((head(backbone(images)).argmax(dim=1) == labels).sum())
            total += len(labels)
    bad.check()
    if not total:
        raise BadDataError(f"{bad.summary()}: no validation image to score")
    return 100.0 * correct / total


def untrained_backbone(p: PretrainConfig) -> tuple[nn.Module, dict]:
    """The classifier's backbone, laid out for training, and the config that rebuilds it."""
    if p.architecture == "cnn":
        arch_config = {"widths": list(p.cnn_widths)}
    else:
        arch_config = p.vit.model_dump() | {"image_size": p.image_size}
    backbone = ARCHITECTURES[p.architecture](**arch_config)
    if p.architecture == "cnn" and backbone.trains_channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)  # ~1.3x faster on CPU
    return backbone, arch_config


def pretrain(cfg: ExperimentConfig, progress: bool = True) -> Path:
    """Train the classifier of ``cfg.pretrain``; returns the checkpoint path."""
    p = cfg.pretrain
    train_set, val_set = pretraining_data(cfg)
    torch.manual_seed(cfg.train.seed)
    backbone, arch_config = untrained_backbone(p)
    head = nn.Linear(backbone.feature_dim, len(train_set.class_names))
    pre = Preprocessing(p.image_size, PRETRAIN_MEAN, PRETRAIN_STD, crop_fraction=1.0)
    augment = PixelTrainTransform(pre, scale=tuple(p.crop_scale))
    # With data.preload every image is decoded once, not once per epoch: the same pixels.
    cache_dir = cfg.data.cache_dir if cfg.data.preload else None

    def images(data: ClassificationSet) -> Dataset:
        return image_rows(data.image_paths, WholeImage(), cache_dir, p.num_workers, progress)

    train_images = LabelledImages(train_set, images(train_set), pre, augment, cfg.train.seed)
    val_images = LabelledImages(val_set, images(val_set), pre)
    val_loader = DataLoader(
        val_images, batch_size=256, num_workers=p.num_workers, collate_fn=val_images.collate
    )
    bad_train = BadSampleLog(cfg.data.max_bad_fraction, "pretraining images", len(train_set))
    model = nn.ModuleDict({"backbone": backbone, "head": head})
    optimizer, schedule = make_optimizer(model, p.lr, p.weight_decay, p.warmup_steps, p.steps)

    step, bar = 0, tqdm(total=p.steps, disable=not progress, desc="pretrain", unit="step")
    while step < p.steps:
        order = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + train_images.epoch)
        loader = DataLoader(
            train_images,
            batch_size=p.batch_size,
            shuffle=True,
            drop_last=True,
            generator=order,
            num_workers=p.num_workers,
            collate_fn=train_images.collate,
        )
        backbone.train()
        steps_before = step
        for images, labels, skipped in loader:
            bad_train.record(len(labels), skipped)
            if images is None:
                continue
            loss = F.cross_entropy(head(backbone(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= p.steps:
                break
        if step == steps_before:  # else the loop would go round empty epochs for ever
            raise BadDataError(
                f"an epoch of {len(train_set)} pretraining images gave no batch to train on "
                f"(pretrain.batch_size={p.batch_size}; {bad_train.summary()})"
            )
        train_images.epoch += 1
    bar.close()
    bad_val = BadSampleLog(cfg.data.max_bad_fraction, "validation images", len(val_set))
    val_top1 = accuracy(backbone, head, val_loader, bad_val)
    for bad in (bad_train, bad_val):
        if bad.total:
            log.warning(bad.summary())
    out = Path(p.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(
        out,
        Classifier(backbone, head, p.architecture, arch_config, pre, list(train_set.class_names)),
    )
    report = {
        "val_top1": val_top1,
        "steps": p.steps,
        "classes": len(train_set.class_names),
        "train_images": len(train_set),
        "architecture": p.architecture,
        "skipped_images": {"train": bad_train.total, "val": bad_val.total},
    }
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=1))
    return out
