"""What ``threetowers index`` reads: images, each with an id, where it came from, and the
captions the data has for it.

Three kinds of source: a folder of image files (no captions), a Karpathy-split JSON (the
retrieval sets' format: images with their captions) and any training source (a CSV / TSV /
JSONL table or webdataset shards). Items are listed without decoding anything; ``load``
decodes one, or raises :class:`BadSample` saying why it cannot be used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from threetowers.apps.embed import image_files
from threetowers.data.benchmarks import load_karpathy
from threetowers.data.sources.decode import load_image
from threetowers.data.sources.fields import DEFAULT_FIELDS, Fields
from threetowers.data.sources.pairs import open_pairs
from threetowers.data.sources.shards import decode_sample, shard_sample_id, shard_samples
from threetowers.data.sources.table import PairTable
from threetowers.errors import UserError

Loaded = tuple[Image.Image, list[str]]  # the decoded image and its captions


@dataclass(frozen=True)
class Item:
    id: str  # unique within the source: names the image in results and in skipped lists
    location: str  # the image file, or SHARD/KEY for a shard member
    load: Callable[[], Loaded]


@dataclass(frozen=True)
class IndexSource:
    """A source's description (recorded in the index), its size and its items in order."""

    description: str
    size: int
    items: Callable[[], Iterator[Item]]


def index_source(
    images: str | Path | None = None,
    data: str | Path | None = None,
    split: str = "test",
    allow_absolute_paths: bool = False,
    fields: Fields = DEFAULT_FIELDS,
) -> IndexSource:
    """``--images DIR`` or ``--data SOURCE`` (a Karpathy ``.json``, of which ``split``, or a
    training source, read as ``fields`` say: the run's data.image_key and caption_key)."""
    if (images is None) == (data is None):
        raise UserError("give exactly one of --images DIR or --data SOURCE")
    if images is not None:
        return _image_folder(Path(images))
    if str(data).endswith(".json"):
        return _karpathy(Path(data), split, allow_absolute_paths)
    return _pairs(data, allow_absolute_paths, fields)


def _image_folder(root: Path) -> IndexSource:
    paths = image_files(root)

    def items() -> Iterator[Item]:
        for path in paths:
            key = str(path.relative_to(root))
            yield Item(key, str(path), lambda path=path, key=key: (load_image(path, key), []))

    return IndexSource(f"images under {root.resolve()}", len(paths), items)


def _karpathy(path: Path, split: str, allow_absolute_paths: bool) -> IndexSource:
    retrieval = load_karpathy(path, split=split, allow_absolute_paths=allow_absolute_paths)
    captions: list[list[str]] = [[] for _ in retrieval.image_paths]
    for caption, owner in zip(retrieval.captions, retrieval.image_of_caption.tolist(), strict=True):
        captions[owner].append(caption)
    root = path.parent

    def items() -> Iterator[Item]:
        for image, texts in zip(retrieval.image_paths, captions, strict=True):
            key = str(image.relative_to(root)) if image.is_relative_to(root) else str(image)

            def load(image: Path = image, key: str = key, texts: list = texts) -> Loaded:
                return load_image(image, key), texts

            yield Item(key, str(image), load)

    return IndexSource(f"{split} split of {path.resolve()}", len(retrieval.image_paths), items)


def _pairs(source: str | Path, allow_absolute_paths: bool, fields: Fields) -> IndexSource:
    pairs = open_pairs(source, fields=fields, allow_absolute_paths=allow_absolute_paths)
    description = f"pairs of {Path(source).resolve() if Path(source).exists() else source}"
    if isinstance(pairs, PairTable):

        def table_items() -> Iterator[Item]:
            for row, key in enumerate(pairs.ids):

                def load(row: int = row) -> Loaded:
                    pair = pairs[row]  # raises the row's BadSample
                    return pair.image, pair.captions

                yield Item(key, str(pairs.images[row]), load)

        return IndexSource(description, len(pairs), table_items)

    def shard_items() -> Iterator[Item]:
        for sample in shard_samples(pairs.shards):
            name = shard_sample_id(sample)

            def load(sample: dict = sample) -> Loaded:
                pair = decode_sample(sample, pairs.fields)
                return pair.image, pair.captions

            yield Item(name, name, load)

    return IndexSource(description, len(pairs), shard_items)
