"""What a training run reads: its pairs, its tokenizer, each tower's view, the frozen
towers' feature caches."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch

from threetowers import distributed
from threetowers.config import Config, ConfigError, WorldConfig
from threetowers.data.caches.features import FeatureCache, feature_cache
from threetowers.data.caches.preload import preload_pairs
from threetowers.data.sources.loader import num_batches, pair_batches
from threetowers.data.sources.pairs import Pair, PairTable, ShardPairs, iter_captions, open_pairs
from threetowers.data.tokenizer import CaptionTokenizer, MemoisedEncoder
from threetowers.data.transforms import EvalTransform, TrainTransform
from threetowers.data.world.generate import WorldSpec, write_world
from threetowers.model.three_towers import ThreeTowers

# Tokenizers' own thread pool does not survive DataLoader worker forks; captions are short.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ensure_world(world: WorldConfig) -> dict:
    """Generate the embedded world on first use; return its manifest (with its root)."""
    manifest_path = write_world(world.dir, WorldSpec(**world.model_dump(exclude={"dir"})))
    return json.loads(manifest_path.read_text()) | {"root": str(manifest_path.parent)}


def training_source(cfg: Config) -> tuple[str | list[str], dict | None]:
    """The training pairs (the user's, or the world's train shards) and the world manifest."""
    if cfg.data.train is not None:
        return cfg.data.train, None
    manifest = ensure_world(cfg.data.world)
    root = Path(manifest["root"])
    return [str(root / name) for name in manifest["files"]["pairs/train"]], manifest


def open_training_pairs(cfg: Config) -> tuple[PairTable | ShardPairs, dict | None]:
    """The opened training pairs, under the config's path policy, and the world manifest."""
    source, world = training_source(cfg)
    try:
        pairs = open_pairs(source, allow_absolute_paths=cfg.data.allow_absolute_paths)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"data.train: {error}; set data.train to a .csv/.tsv/.jsonl file, a directory of "
            ".tar shards or a shard pattern, or leave it unset for the embedded world"
        ) from None
    return pairs, world


def load_or_train_tokenizer(cfg: Config, run_dir: Path, source) -> CaptionTokenizer:
    """The configured tokenizer, the run's own (on resume), or a new one trained on the
    training captions; the run directory always keeps a copy."""
    context = cfg.model.text.context_length
    saved = run_dir / "tokenizer.json"
    if cfg.data.tokenizer is not None:
        try:
            tokenizer = CaptionTokenizer.load(cfg.data.tokenizer, context)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"data.tokenizer: {error}; give a tokenizer.json (e.g. one a run wrote), or "
                "leave data.tokenizer unset to train one on the training captions"
            ) from None
    elif saved.exists():
        tokenizer = CaptionTokenizer.load(saved, context)
    else:
        tokenizer = CaptionTokenizer.train(
            iter_captions(source), cfg.model.text.vocab_size, context
        )
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
            f"{cfg.model.text.vocab_size}; raise model.text.vocab_size"
        )
    if not saved.exists():
        tokenizer.save(saved)  # atomic: a resume must never read half a tokenizer
    return tokenizer


# Loader fields hold one tensor each: a live frozen tower's view travels as FROZEN_IMAGES/NAME
# and is regrouped into the batch's ``frozen_images`` dict.
FROZEN_IMAGES = "frozen_images"


class _Pixels:
    """Transform mixin: end at uint8 (3, S, S) pixels instead of normalised float32.

    On a few CPU cores the loader's per-image work bounds the training loop, and scaling and
    normalising one small image at a time costs more in per-call overhead than in arithmetic.
    :class:`Normalise` does it once per batch with the same operations in the same order, so
    the floats equal the transforms' own bit for bit.
    """

    def _finish(self, image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class PixelEvalTransform(_Pixels, EvalTransform):
    """``EvalTransform`` (resize, centre crop) returning uint8 pixels; see :class:`Normalise`."""


class PixelTrainTransform(_Pixels, TrainTransform):
    """``TrainTransform`` (random resized crop) returning uint8 pixels; see :class:`Normalise`."""


class Normalise:
    """uint8 (B, 3, S, S) pixels -> the normalised float32 batch of ``pre``'s transforms."""

    def __init__(self, pre) -> None:
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)


class TrainingExample:
    """One pair -> the tensors a step needs. Picklable, so it runs in loader workers.

    Images leave as uint8 pixels (``PixelEvalTransform``/``PixelTrainTransform``) and
    captions as text; ``TrainingData.batches`` normalises and tokenises a whole batch at once,
    which costs a fraction of doing it per sample. A frozen tower that runs live in 3t gets
    its own view, as ``frozen_images/NAME``.
    """

    def __init__(self, image_view=None, augment=None, frozen_views=None) -> None:
        self.image_view = image_view  # f's (or in lit, the locked tower's) view; None: unused
        self.augment = augment  # f's random resized crop; None: no augmentation
        self.frozen_views = dict(frozen_views or {})  # name -> its eval view, towers run live

    def __call__(self, pair: Pair, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor | str] = {"captions": pair.caption}
        if self.augment is not None:
            out["images"] = self.augment(pair.image, rng)
        elif self.image_view is not None:
            out["images"] = self.image_view(pair.image)
        for name, view in self.frozen_views.items():
            out[f"{FROZEN_IMAGES}/{name}"] = view(pair.image)
        return out


def _already_decoded(pixels: torch.Tensor) -> torch.Tensor:
    """The image view of preloaded pairs: their images are f's pixels already."""
    return pixels


class TrainingData:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.pairs, self.world = open_training_pairs(cfg)
        self.source = self.pairs  # as opened (``pairs`` becomes the preloaded table)
        self.tokenizer = load_or_train_tokenizer(cfg, run_dir, self.pairs)
        self.caches: dict[str, FeatureCache] = {}  # frozen tower -> its feature cache
        self.example: TrainingExample | None = None
        self.normalise: Normalise | None = None  # the image view's normalisation
        self.frozen_normalise: dict[str, Normalise] = {}  # live frozen tower -> its own
        self.encode = self.tokenizer.encode  # captions -> token ids (memoised when preloaded)

    def attach(self, model: ThreeTowers, progress: bool = True) -> None:
        """Choose each tower's view for this model; build or load the frozen towers' caches."""
        data = self.cfg.data
        if data.cache:
            self.caches = {
                name: feature_cache(
                    tower,
                    self.pairs,
                    data.cache_dir,
                    data.batch_size,
                    data.num_workers,
                    progress,
                    data.max_bad_fraction,
                )
                for name, tower in model.frozen.items()
            }
        trains_f = model.image_tower is not None
        # lit's image view is the locked tower's input, needed only when it runs live
        needs_images = trains_f or any(name not in self.caches for name in model.frozen)
        pre = model.image_preprocessing
        view = PixelEvalTransform(pre) if needs_images else None
        augment = None
        if trains_f and data.augment:
            augment = PixelTrainTransform(pre, scale=tuple(data.crop_scale))
        self.normalise = Normalise(pre) if needs_images else None
        live = [name for name in model.structure.aligned if name not in self.caches]
        frozen_views = {name: PixelEvalTransform(model.frozen[name].preprocessing) for name in live}
        self.frozen_normalise = {name: Normalise(model.frozen[name].preprocessing) for name in live}
        if data.preload:
            if augment is not None or frozen_views:
                raise ConfigError(
                    "data.preload decodes each image once, so every view must be fixed: set "
                    "data.augment=false, and keep data.cache=true in 3t (the frozen towers' "
                    "views are not preloaded), or set data.preload=false"
                )
            self.pairs = preload_pairs(self.pairs, view, data.cache_dir, progress)
            self.encode = MemoisedEncoder(self.tokenizer)
            view = _already_decoded if view is not None else None
        self.example = TrainingExample(view, augment, frozen_views)

    def batches(self, epoch: int, start_batch: int):
        """This rank's batches of ``epoch`` from ``start_batch`` on: ``data.batch_size`` is the
        global batch, split evenly over the ranks, which read disjoint samples."""
        data, world = self.cfg.data, distributed.world_size()
        split = {
            "batch_size": distributed.local_batch_size(data.batch_size),
            "seed": self.cfg.train.seed,
            "epoch": epoch,
            "world_size": world,
            # preloaded rows are a memory read: worker processes would cost more than they save
            "num_workers": 0 if data.preload else data.num_workers,
        }
        batches = pair_batches(
            self.pairs,
            example=self.example,
            start_batch=start_batch,
            rank=distributed.rank(),
            shuffle_buffer=data.shuffle_buffer,
            **split,
        )
        if world > 1:  # shard ranks may plan different counts: all stop at the least
            least = min(num_batches(self.pairs, rank=r, **split) for r in range(world))
            batches = itertools.islice(batches, max(0, least - start_batch))
        for batch in batches:
            if not batch["ids"]:  # only bad samples: nothing to prepare
                yield batch
                continue
            batch["tokens"] = self.encode(batch.pop("captions"))
            if self.normalise is not None:
                batch["images"] = self.normalise(batch["images"])
            if self.frozen_normalise:
                batch[FROZEN_IMAGES] = {
                    name: normalise(batch.pop(f"{FROZEN_IMAGES}/{name}"))
                    for name, normalise in self.frozen_normalise.items()
                }
            if self.caches:
                batch["frozen_features"] = {
                    name: cache.lookup(batch["ids"]) for name, cache in self.caches.items()
                }
            # Padding never changes a caption's embedding, so drop the all-padding columns:
            # the text tower's cost follows the longest caption, not the context length.
            longest = int((batch["tokens"] != self.tokenizer.pad_id).sum(dim=1).max())
            batch["tokens"] = batch["tokens"][:, :longest]
            yield batch

    def fingerprints(self) -> dict[str, str]:
        """What a checkpoint records so that a resume with other data is caught."""
        tokenizer = hashlib.sha256(self.tokenizer.to_json().encode()).hexdigest()
        out = {"tokenizer_sha256": tokenizer}
        return out | {f"feature_cache/{n}": cache.fingerprint for n, cache in self.caches.items()}
