"""Evaluation sets: Karpathy-split retrieval (Flickr30k, COCO) and class-folder classification.

Images that turn out unreadable when they are embedded are skipped and counted by the
evaluation (``ImageFiles`` marks them); only a set with no image at all is refused here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from threetowers.data.sources.bad_samples import BadSample, Skipped
from threetowers.data.sources.decode import load_image
from threetowers.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


class BenchmarkError(UserError, ValueError):
    """A benchmark's files (a Karpathy split file, a class folder) that cannot be read as one."""


DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a picture of a {}.",
)
_INDEX_PREFIX = re.compile(r"^\d+_")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalSet:
    """Images and their captions; caption ``j`` describes image ``image_of_caption[j]``."""

    image_paths: list[Path]
    captions: list[str]
    image_of_caption: torch.Tensor

    def __len__(self) -> int:
        return len(self.image_paths)


@dataclass(frozen=True)
class ClassificationSet:
    """Images with labels; ``class_names[label]`` fills each ``{}`` of ``templates``."""

    image_paths: list[Path]
    labels: torch.Tensor
    class_names: list[str]
    templates: list[str]

    def __len__(self) -> int:
        return len(self.image_paths)


# The folder the Flickr30k download unpacks its images into, which its Karpathy JSON (whose
# entries have no "filepath") is usually kept beside.
FLICKR30K_IMAGES = "flickr30k-images"


def load_karpathy(
    json_path: str | Path,
    image_root: str | Path | None = None,
    split: str | Sequence[str] = "test",
    allow_absolute_paths: bool = False,
) -> RetrievalSet:
    """Read ``dataset_flickr30k.json`` / ``dataset_coco.json`` (Karpathy splits).

    Image ``i`` lives at ``image_root / filepath / filename`` (``filepath`` only in COCO).
    ``image_root`` defaults to the JSON's folder (COCO: the JSON beside ``train2014/`` and
    ``val2014/``), or, when none of the images is there, to its ``flickr30k-images/``
    subfolder (Flickr30k: the JSON beside the unpacked images); the folder used is logged.
    No entry may lead out of it unless ``allow_absolute_paths``. ``split`` may be one name
    or several (e.g. ``("train", "restval")``). Captions are the ``raw`` sentences,
    stripped. Missing images are skipped when the set is embedded; none found at all is an
    error.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split file not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkError(
            f"{json_path} is not a Karpathy split file: not JSON ({error}); give the "
            "dataset_*.json of a Karpathy split"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BenchmarkError(f"{json_path} is not a Karpathy split file (no 'images' list)")
    if not all(isinstance(image, dict) for image in data["images"]):
        raise BenchmarkError(f"{json_path}: every entry of 'images' must be an object")
    wanted = {split} if isinstance(split, str) else set(split)
    present = sorted({str(image.get("split")) for image in data["images"]})
    unknown = sorted(wanted - set(present))
    if unknown:
        raise BenchmarkError(f"{json_path} has no split {unknown}; it has splits {present}")
    candidates = [Path(image_root)] if image_root is not None else _default_roots(json_path)
    relatives: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    for number, image in enumerate(data["images"]):
        if image.get("split") not in wanted:
            continue
        try:
            relative = Path(image.get("filepath", "")) / image["filename"]
            raw = [sentence["raw"].strip() for sentence in image.get("sentences", [])]
        except (KeyError, TypeError, AttributeError) as error:
            raise BenchmarkError(
                f"{json_path}: image entry {number} needs a 'filename' and sentences with a "
                f"'raw' caption ({error!r})"
            ) from None
        normal = Path(os.path.normpath(relative))
        if not allow_absolute_paths and (normal.is_absolute() or normal.parts[:1] == ("..",)):
            raise BenchmarkError(
                f"{json_path}: image {str(relative)!r} leads out of the image root "
                f"{candidates[0]}; set data.allow_absolute_paths=true if that is intended"
            )
        owners += [len(relatives)] * len(raw)
        relatives.append(relative)
        captions += raw
    root = next((r for r in candidates if any((r / p).is_file() for p in relatives)), None)
    if relatives and root is None:
        tried = " or ".join(str(r) for r in candidates)
        raise FileNotFoundError(
            f"none of the {len(relatives)} images of {json_path} was found under {tried} "
            f"(e.g. {candidates[0] / relatives[0]}): the image root must be the folder that "
            "the entries' filepath/filename are relative to"
        )
    root = root or candidates[0]
    splits = "+".join(sorted(wanted))
    log.info("%s: %d %s images under %s", json_path.name, len(relatives), splits, root)
    image_paths = [root / relative for relative in relatives]
    return RetrievalSet(image_paths, captions, torch.tensor(owners, dtype=torch.long))


def _default_roots(json_path: Path) -> list[Path]:
    """Where a Karpathy JSON's images are looked for when no image root is given."""
    beside = json_path.parent
    flickr = beside / FLICKR30K_IMAGES
    return [beside, flickr] if flickr.is_dir() else [beside]


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _readable_name(folder: str) -> str:
    return _INDEX_PREFIX.sub("", folder).replace("_", " ").strip()


def load_class_folder(root: str | Path, split: str | None = None) -> ClassificationSet:
    """Images under ``root/<split>/<class folder>/`` (or ``root/<class folder>/``).

    Label ids follow the sorted folder names (plain string order, so number prefixes should
    be zero-padded). Class names come from ``root/classnames.txt`` (one per line, in that
    order) or else from the folder names, without a leading ``NNN_`` and with ``_`` as
    spaces. Templates come from ``root/templates.txt`` (one per line, each with ``{}``) or
    else :data:`DEFAULT_TEMPLATES`.
    """
    root = Path(root)
    images_root = root / split if split is not None else root
    if not images_root.is_dir():
        raise FileNotFoundError(f"class folder root not found: {images_root}")
    folders = sorted(p.name for p in images_root.iterdir() if p.is_dir() and p.name[0] != ".")
    if not folders:
        raise BenchmarkError(f"no class folders in {images_root}")
    image_paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = sorted(
            p
            for p in (images_root / folder).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != "."
        )
        if not files:
            raise BenchmarkError(f"class folder {images_root / folder} holds no images")
        image_paths += files
        labels += [label] * len(files)

    names_file = root / "classnames.txt"
    if names_file.is_file():
        class_names = _read_lines(names_file)
        if len(class_names) != len(folders):
            raise BenchmarkError(
                f"{names_file} has {len(class_names)} names but {images_root} has "
                f"{len(folders)} class folders; give one name per folder, in sorted folder order"
            )
    else:
        class_names = [_readable_name(folder) for folder in folders]

    templates_file = root / "templates.txt"
    if templates_file.is_file():
        templates = _read_lines(templates_file)
        if not templates:
            raise BenchmarkError(f"{templates_file} holds no templates")
        for number, template in enumerate(templates, start=1):
            if "{}" not in template:
                raise BenchmarkError(
                    f"{templates_file}: template {number} ({template!r}) has no '{{}}' for "
                    "the class name"
                )
    else:
        templates = list(DEFAULT_TEMPLATES)
    return ClassificationSet(
        image_paths, torch.tensor(labels, dtype=torch.long), class_names, templates
    )


class ImageFiles(Dataset):
    """Evaluation images as (index, transform(image)) for batched embedding, or
    (index, Skipped) for an image that cannot be used; batch them with :func:`collate_images`.
    """

    def __init__(self, paths: Sequence[str | Path], transform: Callable) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | Skipped]:
        path = self.paths[index]
        try:
            image = load_image(path, "image")  # the key names the file
        except BadSample as bad:
            return index, bad.skipped(str(path))
        return index, self.transform(image)


def collate_images(
    items: list[tuple[int, torch.Tensor | Skipped]],
) -> tuple[torch.Tensor, torch.Tensor | None, list[Skipped]]:
    """(indices of the usable images, their stacked tensors or None, the skipped ones)."""
    used = [(index, image) for index, image in items if not isinstance(image, Skipped)]
    skipped = [image for _, image in items if isinstance(image, Skipped)]
    indices = torch.tensor([index for index, _ in used], dtype=torch.long)
    images = torch.stack([image for _, image in used]) if used else None
    return indices, images, skipped
