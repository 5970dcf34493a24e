"""Third-tower feature cache: run the frozen h once over a dataset, reuse it every epoch.

h is frozen and never sees augmentation, so its features of a sample never change: caching
them turns LiT and 3T training into the cost of CLIP's (or less). A cache file is named by a
fingerprint of everything its contents depend on — the backbone's weights, its
preprocessing and the dataset's files — so a changed backbone, preprocessing or dataset
never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from stat import S_ISLNK
from typing import TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from threetowers.atomic import remove_temporaries, save_tensors
from threetowers.backbones.frozen import FrozenBackbone
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog
from threetowers.data.sources.loader import pair_batches
from threetowers.data.sources.pairs import PairTable, ShardPairs, open_pairs
from threetowers.data.transforms import eval_transform

log = logging.getLogger(__name__)
T = TypeVar("T")


class FeatureCache:
    """h's features for every sample of a dataset, by sample id (``SHARD/KEY`` for shards,
    whose keys may repeat across shards)."""

    def __init__(self, ids: list[str], features: torch.Tensor, fingerprint: str) -> None:
        self.row = {sample_id: i for i, sample_id in enumerate(ids)}
        if len(self.row) != len(ids):
            raise ValueError(f"feature cache {fingerprint[:12]}: two rows share a sample id")
        self.features = features
        self.fingerprint = fingerprint

    def lookup(self, ids: list[str]) -> torch.Tensor:
        try:
            rows = [self.row[sample_id] for sample_id in ids]
        except KeyError as error:
            raise KeyError(
                f"sample {error.args[0]!r} is not in the feature cache {self.fingerprint[:12]}; "
                "the dataset changed since it was made - delete the cache file to rebuild it"
            ) from None
        return self.features[torch.tensor(rows)]


def backbone_digest(backbone: FrozenBackbone) -> str:
    digest = hashlib.sha256(json.dumps(backbone.preprocessing.to_dict()).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# Caches keyed by sample: version 2 names shard samples ``SHARD/KEY`` (version 1: ``KEY``,
# which confused samples of shards numbered alike), so no version 1 file is ever reused.
SAMPLE_IDS = 2


def dataset_digest(source) -> str:
    """Identity of a dataset's files (paths, sizes and modification times) and of the sample
    ids they give: shard ids hold the shard paths as the source spells them."""
    pairs = open_pairs(source)
    files = pairs.shards if isinstance(pairs, ShardPairs) else [pairs.name]
    spelled = json.dumps([SAMPLE_IDS, *map(str, files)])
    return hashlib.sha256(f"{files_digest(files)}|{spelled}".encode()).hexdigest()


def files_digest(paths) -> str:
    """Identity of files, in order: resolved paths, sizes and modification times; a file that
    cannot be found counts as missing (it is a bad sample), so its arrival changes it."""
    digest = hashlib.sha256()
    folders: dict[str, str] = {}  # resolved once each: thousands of images share a few
    for path in paths:
        folder, name = os.path.split(os.fspath(Path(path)))
        try:
            stat = os.lstat(path)
            if S_ISLNK(stat.st_mode):
                real, stat = Path(path).resolve(), os.stat(path)
            else:
                if folder not in folders:
                    folders[folder] = os.path.realpath(folder)
                real = os.path.join(folders[folder], name)
        except OSError:
            digest.update(f"{Path(path).resolve()}|missing\n".encode())
            continue
        digest.update(f"{real}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_base(cache_dir: str | Path, kind: str, spec: dict) -> Path:
    """``cache_dir/KIND-HASH``: a name that changes with anything in ``spec``, the
    JSON-able description of everything a cached file's contents depend on."""
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / f"{kind}-{fingerprint}"


class _FrozenView:
    """A loader example: only the frozen tower's view of the image (picklable for workers)."""

    def __init__(self, backbone: FrozenBackbone) -> None:
        self.transform = eval_transform(backbone.preprocessing)

    def __call__(self, pair, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return {"pixels": self.transform(pair.image)}


def feature_cache(
    backbone: FrozenBackbone,
    source,
    cache_dir: str | Path,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    max_bad_fraction: float = 1.0,
) -> FeatureCache:
    """Load the cache of (backbone, source), computing and saving it first if missing.

    Bad samples have no row (training skips them too); more than ``max_bad_fraction`` of
    them stop the computation with :class:`BadDataError`."""
    fingerprint = hashlib.sha256(
        f"{backbone_digest(backbone)}|{dataset_digest(source)}".encode()
    ).hexdigest()
    path = Path(cache_dir).expanduser() / f"{backbone.name}-{fingerprint[:24]}.safetensors"

    def parse(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> FeatureCache:
        return FeatureCache(json.loads(meta["ids"]), tensors["features"], fingerprint)

    cached = read_features(path, parse)
    if cached is not None:
        return cached
    ids, features = _compute(backbone, source, batch_size, num_workers, progress, max_bad_fraction)
    write_features(path, {"features": features}, {"ids": json.dumps(ids)})
    return FeatureCache(ids, features, fingerprint)


def read_features(
    path: Path, parse: Callable[[dict[str, torch.Tensor], dict[str, str]], T]
) -> T | None:
    """``parse(tensors, metadata)`` of a cache file; None when it is absent or unreadable
    (it is then computed again)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            return parse(tensors, handle.metadata())
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        log.warning("feature cache %s is unreadable (%s); computing it again", path, error)
        return None


def write_features(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path.parent, only_dead_writers=True)  # shared by concurrent runs
    save_tensors(path, tensors, metadata)


@torch.no_grad()
def _compute(backbone, source, batch_size, num_workers, progress, max_bad_fraction):
    pairs = open_pairs(source)
    bad_data = BadSampleLog(max_bad_fraction, f"caching {backbone.name} features", len(pairs))
    device = next(backbone.parameters()).device
    ids, chunks = [], []
    batches = pair_batches(
        pairs,
        example=_FrozenView(backbone),
        batch_size=batch_size,
        seed=0,
        epoch=0,
        num_workers=num_workers,
        drop_last=False,
    )
    total = len(pairs) if isinstance(pairs, (PairTable, ShardPairs)) else None
    with tqdm(total=total, disable=not progress, desc=f"caching {backbone.name} features") as bar:
        for batch in batches:
            bad_data.record(len(batch["ids"]), batch["skipped"])
            bar.update(len(batch["ids"]) + len(batch["skipped"]))
            if batch["ids"]:
                chunks.append(backbone(batch["pixels"].to(device)).float().cpu())
                ids.extend(batch["ids"])
    if not ids:
        raise BadDataError(f"{bad_data.summary()}: nothing to cache")
    if bad_data.total:
        log.warning(bad_data.summary())
    return ids, torch.cat(chunks)
