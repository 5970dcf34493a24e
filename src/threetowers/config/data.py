"""The ``data`` section: what trains (files, or the embedded world), and how it is read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from threetowers.config.base import Section
from threetowers.data.caches.precision import CachePrecision


class WorldConfig(Section):
    """The embedded image-caption world, generated on first use (project/world/)."""

    dir: str = Field("worlds/default", description="Where the world is generated and read.")
    seed: int = Field(0, description="The world's seed.")
    image_size: int = Field(64, gt=7, description="Its images' size in pixels.")
    train_pairs: int = Field(20000, gt=0, description="Training image-caption pairs.")
    val_pairs: int = Field(1000, gt=0, description="Validation pairs (val_loss).")
    retrieval_test: int = Field(1000, gt=0, description="Images of the retrieval test set.")
    retrieval_val: int = Field(500, gt=0, description="Images of the retrieval validation set.")
    captions_per_image: int = Field(5, gt=0, description="Captions per retrieval image.")
    zeroshot_per_class: int = Field(100, gt=0, description="Zero-shot test images per class.")
    zeroshot_val_per_class: int = Field(
        50, gt=0, description="Zero-shot validation images per class."
    )
    pretrain_objects_per_class: int = Field(
        1500, gt=0, description="Images per class of the objects set (for `pretrain`)."
    )
    pretrain_scenes_per_class: int = Field(
        600, gt=0, description="Images per class of the scenes set (for `pretrain`)."
    )
    shard_size: int = Field(2000, gt=0, description="Pairs per .tar shard.")
    workers: int = Field(2, gt=0, description="Processes that generate it.")


class TrainSource(Section):
    """One of several training sources (``data.train`` as a list)."""

    source: str = Field(description="Anything data.train accepts alone.")
    weight: float = Field(
        1.0, gt=0, description="Its share of the samples drawn (needs data.resampled)."
    )
    name: str | None = Field(
        None, description="Names its metrics (data/source/NAME/samples); null: its position."
    )


class DataConfig(Section):
    """The training data and how it is read, cached and checked."""

    train: str | list[TrainSource] | None = Field(
        None,
        description="Image-caption pairs: a CSV/TSV/JSONL file, .tar or .parquet shards (a "
        "directory or pattern), several as a list of {source, weight, name} or OpenCLIP's "
        "'A::B'; null: the embedded world.",
    )
    train_weights: str | float | None = Field(
        None, description="With train 'A::B': one weight per source, 'W1::W2'."
    )
    resampled: bool = Field(
        False,
        description="Draw shards with replacement, in proportion to the sources' weights "
        "(webdataset's resampling): an epoch is one pass's worth of samples, not every sample "
        "once.",
    )
    image_key: str | None = Field(
        None,
        description="Where each sample's image is: a table's column, a JSONL key or a shard's "
        "member extension ('jpg;png'); null: image in tables, the usual image members in "
        "shards.",
    )
    caption_key: str | None = Field(
        None,
        description="Where each sample's captions are: a column, a JSONL key, a member "
        "extension or a field of its .json member; null: caption (or captions) in tables, .txt "
        "in shards.",
    )
    world: WorldConfig = Field(WorldConfig(), description="The embedded world.")
    tokenizer: str | None = Field(
        None, description="A tokenizer.json; null: train a BPE on the training captions."
    )
    tokenizer_sample: int = Field(
        1_000_000,
        gt=0,
        description="At most this many training captions train that BPE: a dataset with more "
        "is sampled, whole shards in a fixed order, so a start reads about this many captions "
        "rather than every shard (docs/data.md). 1M captions (~80 MB of text) are ample for a "
        "vocabulary of tens of thousands of tokens and train in ~10 s; a smaller dataset "
        "trains on every caption, as before.",
    )
    batch_size: int = Field(256, gt=0, description="Pairs per step (over all processes).")
    num_workers: int = Field(1, ge=0, description="Loader worker processes.")
    shuffle_buffer: int = Field(2000, ge=1, description="Samples shuffled in memory (shards).")
    augment: bool = Field(
        True,
        description="Random resized crops for the image tower f (frozen towers never see "
        "augmentation).",
    )
    crop_scale: tuple[float, float] = Field(
        (0.6, 1.0), description="Area range of the random crops, 0 < low <= high <= 1."
    )
    cache: bool = Field(
        True,
        description="Precompute the frozen towers' features once and reuse them (they are "
        "never augmented), for the training data and the benchmark images.",
    )
    cache_dir: str = Field(
        "~/.cache/threetowers/features", description="Where feature caches are kept."
    )
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="How the training features are stored: float16 halves the disk and the "
        "reads, and moves the pinned runs' losses by under 4e-5 relative "
        "(tests/test_pinned_numbers.py). Evaluation's are always float32.",
    )
    cache_precision: CachePrecision = Field(
        "fp32",
        description="What the frozen towers compute the training features in: fp32, or bf16 "
        "autocast, for GPUs (a cache of its own; stored as cache_dtype says either way).",
    )
    preload: bool = Field(
        False,
        description="Decode f's view of each image once into cache_dir and train from memory "
        "(needs augment false); batches then come from a seeded permutation instead of shard "
        "streams. The benchmark images' views and pretrain's images are decoded once there too.",
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Bad samples (corrupt images, missing files, unusable captions, malformed "
        "rows) are skipped and counted; above this fraction of the samples visited the run "
        "stops: clean datasets have far under 1%, more means something systematic to fix. "
        "1: never stop.",
    )
    allow_absolute_paths: bool = Field(
        False,
        description="Let image paths in CSV/JSONL tables be absolute or climb out of the "
        "table's folder (..): a data file must not make the loader read elsewhere unless asked.",
    )

    def train_sources(self) -> list[TrainSource] | None:
        """``train`` as a list of named sources (None: the embedded world)."""
        if self.train is None:
            return None
        if isinstance(self.train, list):
            items = self.train
        else:
            paths = self.train.split("::")
            weights = str(self.train_weights or "::".join(["1"] * len(paths))).split("::")
            items = [
                TrainSource(source=p, weight=float(w)) for p, w in zip(paths, weights, strict=True)
            ]
        return [
            item.model_copy(update={"name": item.name or str(position)})
            for position, item in enumerate(items)
        ]

    @model_validator(mode="after")
    def _sources_consistent(self) -> DataConfig:
        if self.train_weights is not None:
            if not isinstance(self.train, str) or "::" not in self.train:
                raise ValueError("train_weights goes with data.train='A::B' (one weight each)")
            paths, weights = self.train.split("::"), str(self.train_weights).split("::")
            if len(weights) != len(paths) or not all(_positive(w) for w in weights):
                raise ValueError(
                    f"train_weights needs {len(paths)} positive numbers 'W1::W2...', one per "
                    f"source, got {self.train_weights!r}"
                )
        sources = self.train_sources() or []
        names = [item.name for item in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"train: source names must differ, got {names}")
        if len({item.weight for item in sources}) > 1 and not self.resampled:
            raise ValueError(
                "train: weights draw samples with replacement; set data.resampled=true (or "
                "give every source the same weight to read each sample once per epoch)"
            )
        if self.resampled and self.preload:
            raise ValueError("resampled and preload exclude each other: preload reads rows")
        return self

    @model_validator(mode="after")
    def _crop_scale_in_range(self) -> DataConfig:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False
