"""What a training run reads: its pairs, its tokenizer, each tower's view, the frozen
towers' feature caches.

In two steps, as a start needs them: :func:`open_data` before the model exists (every path
opened, the tokenizer loaded or trained, so a wrong path fails before any long work), then
:class:`TrainingData`, built in one go for the model (the data layer knows the model only
as :class:`~threetowers.data.views.Towers`)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from threetowers import distributed
from threetowers.config import Config, ConfigError
from threetowers.data.caches.captions import CaptionFeatures
from threetowers.data.caches.layout import CacheSpec
from threetowers.data.caches.preload import preload_pairs
from threetowers.data.caches.sharded import build_dataset_caches
from threetowers.data.caches.streamed_features import StreamedFeatures
from threetowers.data.caches.units import dataset_units
from threetowers.data.device import FROZEN_FEATURES, FROZEN_IMAGES
from threetowers.data.sources.bad_samples import BadDataError, refuse_known_bad
from threetowers.data.sources.caption_sample import caption_sample
from threetowers.data.sources.epochs import pair_stream
from threetowers.data.sources.fields import Fields
from threetowers.data.sources.loader import pair_batches
from threetowers.data.sources.mix import SourceMix, open_sources
from threetowers.data.sources.pair import Pair
from threetowers.data.sources.pairs import iter_sample_captions, open_pairs
from threetowers.data.sources.shards import (
    ShardPairs,
)
from threetowers.data.sources.table import PairTable
from threetowers.data.tokenizer import CaptionTokenizer, MemoisedEncoder
from threetowers.data.views import Towers, training_views, validation_views
from threetowers.files.checkpoints import FROZEN_SHA256

# Tokenizers' own thread pool does not survive DataLoader worker forks; captions are short.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def training_sources(cfg: Config, world: dict | None) -> list[tuple[str, object, float]]:
    """The training sources as (name, source, weight): the user's (``data.train``), else the
    embedded world's training shards, from its manifest ``world`` (project.world.default)."""
    sources = cfg.data.train_sources()
    if sources is not None:
        return [(item.name, item.source, item.weight) for item in sources]
    if world is None:
        raise ValueError("data.train is unset: pass the embedded world's manifest (world=)")
    root = Path(world["root"])
    return [("0", [str(root / name) for name in world["files"]["pairs/train"]], 1.0)]


def open_training_pairs(
    cfg: Config, world: dict | None = None
) -> tuple[PairTable | ShardPairs, SourceMix | None]:
    """The opened training pairs (several sources joined), under the config's path policy,
    and the mix of sources (None for a table); ``world``: see :func:`training_sources`."""
    sources = training_sources(cfg, world)
    fields = Fields(cfg.data.image_key, cfg.data.caption_key)
    allow = cfg.data.allow_absolute_paths
    try:
        pairs, mix = open_sources(
            sources,
            lambda source: open_pairs(
                source, fields=fields, allow_absolute_paths=allow, shard_index=cfg.data.cache_dir
            ),
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"data.train: {error}; set data.train to a .csv/.tsv/.jsonl file, a directory of "
            ".tar or .parquet shards or a quoted shard pattern, or leave it unset for the "
            "embedded world"
        ) from None
    if isinstance(pairs, PairTable):  # its rows are read: the real cause comes first
        known = [bad.skipped(pairs.ids[row]) for row, bad in sorted(pairs.bad.items())]
        refuse_known_bad(f"data.train {pairs.name}", len(pairs), known, cfg.data.max_bad_fraction)
        if cfg.data.resampled:
            raise ConfigError(
                f"data.resampled draws shards with replacement; {pairs.name} is a table, read "
                "row by row: write it as shards, or leave data.resampled unset"
            )
    return pairs, mix


def open_val_pairs(cfg: Config) -> PairTable | ShardPairs | None:
    """``eval.val_data``, opened as ``data.train`` is (its fields, its path rule)."""
    if cfg.eval.val_data is None:
        return None
    fields = Fields(cfg.data.image_key, cfg.data.caption_key)
    try:
        return open_pairs(
            cfg.eval.val_data,
            fields=fields,
            allow_absolute_paths=cfg.data.allow_absolute_paths,
            shard_index=cfg.data.cache_dir,
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(f"eval.val_data: {error}") from None


def load_or_train_tokenizer(cfg: Config, run_dir: Path, source) -> CaptionTokenizer:
    """The configured tokenizer, the run's own (on resume), or a new one trained on at most
    ``data.tokenizer_sample`` training captions (``caption_sample``); the run directory always
    keeps a copy, and of a new one what it was trained on (``tokenizer_sample.json``)."""
    context = cfg.model.text.context_length
    saved = run_dir / "tokenizer.json"
    sample = None  # the captions a new tokenizer is trained on
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
        sample = caption_sample(source, cfg.data.tokenizer_sample)
        if not sample.captions:
            raise BadDataError(
                f"data.train: no sample of {source} has a usable caption, so no tokenizer can "
                "be trained; a shard's caption is its .txt or .caption member or its .json's "
                "'captions' or 'caption', a table's its caption column: name another with "
                "data.caption_key"
            )
        tokenizer = CaptionTokenizer.train(sample.captions, cfg.model.text.vocab_size, context)
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
            f"{cfg.model.text.vocab_size}; raise model.text.vocab_size"
        )
    if not saved.exists():
        if sample is not None:  # first: a tokenizer.json then always has its record
            sample.save(run_dir)
        tokenizer.save(saved)  # atomic: a resume must never read half a tokenizer
    return tokenizer


class TrainingExample:
    """One pair -> the tensors a step needs. Picklable, so it runs in loader workers.

    Images leave as uint8 pixels (``PixelEvalTransform``/``PixelTrainTransform``) and stay
    so until the device normalises them (``data/device.py``); captions leave as text, which
    :class:`PreparedBatch` tokenises a batch at a time. A frozen tower that runs live in 3t
    gets its own view, as ``frozen_images/NAME``; a cached one its features, read here from
    its cache's unit of this sample (``frozen_features/NAME``): loader fields hold one tensor
    each, regrouped into the batch's dicts of those names.
    """

    def __init__(
        self, image_view=None, augment=None, frozen_views=None, cached=None, cached_text=None
    ) -> None:
        self.image_view = image_view  # f's (or in lit, the locked tower's) view; None: unused
        self.augment = augment  # f's random resized crop; None: no augmentation
        self.frozen_views = dict(frozen_views or {})  # name -> its eval view, towers run live
        self.cached = dict(cached or {})  # image tower name -> its StreamedFeatures
        self.cached_text = dict(cached_text or {})  # text tower name -> its CaptionFeatures

    def __call__(self, pair: Pair, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor | str] = {"captions": pair.caption}
        if self.augment is not None:
            out["images"] = self.augment(pair.image, rng)
        elif self.image_view is not None:
            out["images"] = self.image_view(pair.image)
        for name, view in self.frozen_views.items():
            out[f"{FROZEN_IMAGES}/{name}"] = view(pair.image)
        for name, features in self.cached.items():
            out[f"{FROZEN_FEATURES}/{name}"] = features.features(pair.row, pair.key)
        for name, features in self.cached_text.items():  # this visit's caption
            out[f"{FROZEN_FEATURES}/{name}"] = features.caption_features(pair.row, pair.caption)
        return out


def _already_decoded(pixels: torch.Tensor) -> torch.Tensor:
    """The image view of preloaded pairs: their images are f's pixels already."""
    return pixels


def _regroup(batch: dict, prefix: str) -> None:
    """Move the loader's ``PREFIX/NAME`` fields into ``batch[PREFIX][NAME]``."""
    names = [key.partition("/")[2] for key in batch if key.startswith(f"{prefix}/")]
    if names:
        batch[prefix] = {name: batch.pop(f"{prefix}/{name}") for name in names}


class PreparedBatch:
    """A collated loader batch as it goes to the device: tokens (the captions stay: a frozen
    text tower reads them), uint8 pixels (normalised there: ``data/device.py``), per-tower
    dicts. Picklable: it runs in the loader workers, so the training process only receives
    batches."""

    def __init__(self, encode, pad_id: int) -> None:
        self.encode, self.pad_id = encode, pad_id

    def __call__(self, batch: dict) -> dict:
        if not batch["ids"]:  # only bad samples: nothing to prepare
            return batch
        batch["tokens"] = self.encode(batch["captions"])
        _regroup(batch, FROZEN_IMAGES)
        _regroup(batch, FROZEN_FEATURES)
        # Padding never changes a caption's embedding, so drop the all-padding columns:
        # the text tower's cost follows the longest caption, not the context length.
        longest = int((batch["tokens"] != self.pad_id).sum(dim=1).max())
        batch["tokens"] = batch["tokens"][:, :longest]
        return batch


@dataclass(frozen=True)
class OpenedData:
    """A run's data as far as it goes before the model exists: every path opened, the
    tokenizer loaded or trained."""

    pairs: PairTable | ShardPairs  # the training pairs, as opened (several sources joined)
    mix: SourceMix | None  # the sources joined (None for a table)
    val_pairs: PairTable | ShardPairs | None  # eval.val_data's
    tokenizer: CaptionTokenizer


def open_data(cfg: Config, run_dir: Path, world: dict | None = None) -> OpenedData:
    """Open the training pairs and ``eval.val_data`` (a wrong path fails before any work),
    then load or train the tokenizer; ``world``: the embedded world's manifest when
    ``data.train`` is unset (project.world.default.default_world)."""
    pairs, mix = open_training_pairs(cfg, world)
    val_pairs = open_val_pairs(cfg)
    return OpenedData(pairs, mix, val_pairs, load_or_train_tokenizer(cfg, run_dir, pairs))


class TrainingData:
    """What a run trains on, built for one model: the frozen towers' caches (built or
    loaded), each tower's view, the pairs (preloaded when ``data.preload``); an epoch's
    prepared batches, and the validation pairs'."""

    def __init__(
        self, cfg: Config, opened: OpenedData, towers: Towers, progress: bool = True
    ) -> None:
        data = cfg.data
        self.cfg, self.tokenizer = cfg, opened.tokenizer
        self.source, self.mix = opened.pairs, opened.mix
        self.val_pairs = opened.val_pairs
        self.frozen_digests = towers.digests
        self.caches: dict[str, StreamedFeatures] = {}  # image tower -> its feature cache
        self.text_caches: dict[str, CaptionFeatures] = {}  # text tower -> its caption cache
        if data.cache and (towers.frozen_images or towers.frozen_text):
            # under torchrun every rank builds its share of the units (caches/sharded.py)
            spec = CacheSpec(data.cache_dir, data.cache_dtype, precision=data.cache_precision)
            self.caches, self.text_caches = build_dataset_caches(
                towers.frozen_images,
                towers.frozen_text,
                dataset_units(self.source),
                spec,
                data.batch_size,
                data.num_workers,
                progress,
                data.max_bad_fraction,
            )
        self.views = training_views(towers, set(self.caches), data.augment, tuple(data.crop_scale))
        self.pairs, encode = self.source, self.tokenizer.encode
        if data.preload:
            if self.views.augment is not None or self.views.frozen:
                raise ConfigError(
                    "data.preload decodes each image once, so every view must be fixed: set "
                    "data.augment=false, and keep data.cache=true in 3t (the frozen towers' "
                    "views are not preloaded), or set data.preload=false"
                )
            self.pairs = preload_pairs(self.pairs, self.views.image, data.cache_dir, progress)
            encode = MemoisedEncoder(self.tokenizer)  # captions -> token ids, once each
            if self.views.image is not None:
                self.views = replace(self.views, image=_already_decoded)
        views = self.views
        self.example = TrainingExample(
            views.image, views.augment, views.frozen, self.caches, self.text_caches
        )
        self.prepare = PreparedBatch(encode, self.tokenizer.pad_id)
        self.val_views = validation_views(towers)
        self.val_example = TrainingExample(self.val_views.image, None, self.val_views.frozen)

    def stream(self, epoch: int, start_batch: int, pin_memory: bool = False):
        """This rank's batches from batch ``start_batch`` of ``epoch`` on, epoch after epoch,
        each with its ``"position"`` (epoch, batch index), through one loader whose workers
        persist (``sources/epochs.py``); it ends at an epoch that holds no batch.
        ``data.batch_size`` is the global batch, split evenly over the ranks, which read
        disjoint samples; ``pin_memory``: batches in page-locked memory, for a GPU."""
        data = self.cfg.data
        batches = pair_stream(
            self.pairs,
            example=self.example,
            prepare=self.prepare,
            batch_size=distributed.local_batch_size(data.batch_size),
            seed=self.cfg.train.seed,
            epoch=epoch,
            start_batch=start_batch,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
            # preloaded rows are a memory read: worker processes would cost more than they save
            num_workers=0 if data.preload else data.num_workers,
            shuffle_buffer=data.shuffle_buffer,
            resampled=self.mix.resampled(self.pairs) if data.resampled else None,
            encoded_images=not data.preload,  # decoded by the views, at the size they need
            pin_memory=pin_memory,
        )
        for at_epoch, index, batch in batches:
            batch["position"] = (at_epoch, index)
            yield batch

    def batches(self, epoch: int, start_batch: int = 0):
        """The batches of one epoch of :meth:`stream` (its loader closed after)."""
        stream = self.stream(epoch, start_batch)
        try:
            for batch in stream:
                if batch["position"][0] != epoch:
                    return
                yield batch
        finally:
            stream.close()

    def validation_batches(self):
        """``eval.val_data``'s batches (one process), prepared like training's; with
        :meth:`val_captions`, what ``evaluation.validation.validate`` reads."""
        shards = getattr(self.val_pairs, "shards", None)
        workers = (
            self.cfg.data.num_workers
            if shards is None
            else min(self.cfg.data.num_workers, len(shards))
        )
        return pair_batches(
            self.val_pairs,
            example=self.val_example,
            prepare=PreparedBatch(self.tokenizer.encode, self.tokenizer.pad_id),
            batch_size=self.cfg.eval.batch_size,
            seed=self.cfg.train.seed,
            epoch=0,
            num_workers=workers,
            shuffle_buffer=1,
            drop_last=False,
            encoded_images=True,
        )

    @functools.cached_property
    def val_captions(self) -> dict[str, list[str]]:
        """Every usable caption of each sample of ``eval.val_data``, by sample id (read once
        for all evaluations)."""
        return dict(iter_sample_captions(self.val_pairs))

    def fingerprints(self) -> dict[str, str]:
        """What a checkpoint records of the data: the tokenizer's and the frozen towers'
        digests, which a resume checks (``files/checkpoints.py``), and the caches'."""
        out = {"tokenizer_sha256": self.tokenizer.digest()}
        out |= {FROZEN_SHA256 + name: digest for name, digest in self.frozen_digests.items()}
        caches = self.caches | self.text_caches
        return out | {f"feature_cache/{n}": cache.fingerprint for n, cache in caches.items()}
