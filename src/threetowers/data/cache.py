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
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from threetowers.atomic import fsync, publish, remove_temporaries, temporary_path
from threetowers.data.bad_samples import BadDataError, BadSampleLog
from threetowers.data.loader import pair_batches
from threetowers.data.pairs import PairTable, ShardPairs, open_pairs
from threetowers.data.transforms import eval_transform
from threetowers.towers.frozen import FrozenBackbone

log = logging.getLogger(__name__)


class FeatureCache:
    """h's features for every sample key of a dataset."""

    def __init__(self, keys: list[str], features: torch.Tensor, fingerprint: str) -> None:
        self.row = {key: i for i, key in enumerate(keys)}
        self.features = features
        self.fingerprint = fingerprint

    def lookup(self, keys: list[str]) -> torch.Tensor:
        try:
            rows = [self.row[key] for key in keys]
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


def dataset_digest(source) -> str:
    """Identity of a dataset's files: paths, sizes and modification times."""
    pairs = open_pairs(source)
    files = pairs.shards if isinstance(pairs, ShardPairs) else [pairs.name]
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class _ThirdView:
    """A loader example: only h's view of the image (picklable for worker processes)."""

    def __init__(self, backbone: FrozenBackbone) -> None:
        self.transform = eval_transform(backbone.preprocessing)

    def __call__(self, pair, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return {"third_images": self.transform(pair.image)}


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
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
                return FeatureCache(keys, handle.get_tensor("features"), fingerprint)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
            log.warning("feature cache %s is unreadable (%s); computing it again", path, error)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path.parent, only_dead_writers=True)  # shared by concurrent runs
    keys, features = _compute(backbone, source, batch_size, num_workers, progress, max_bad_fraction)
    tmp = temporary_path(path)
    save_file({"features": features}, str(tmp), metadata={"keys": json.dumps(keys)})
    fsync(tmp)
    publish(tmp, path)  # complete or absent, never half-written
    return FeatureCache(keys, features, fingerprint)


@torch.no_grad()
def _compute(backbone, source, batch_size, num_workers, progress, max_bad_fraction):
    pairs = open_pairs(source)
    bad_data = BadSampleLog(max_bad_fraction, f"caching {backbone.name} features", len(pairs))
    device = next(backbone.parameters()).device
    keys, chunks = [], []
    batches = pair_batches(
        pairs,
        example=_ThirdView(backbone),
        batch_size=batch_size,
        seed=0,
        epoch=0,
        num_workers=num_workers,
        drop_last=False,
    )
    total = len(pairs) if isinstance(pairs, (PairTable, ShardPairs)) else None
    with tqdm(total=total, disable=not progress, desc=f"caching {backbone.name} features") as bar:
        for batch in batches:
            bad_data.record(len(batch["keys"]), batch["skipped"])
            bar.update(len(batch["keys"]) + len(batch["skipped"]))
            if batch["keys"]:
                chunks.append(backbone(batch["third_images"].to(device)).float().cpu())
                keys.extend(batch["keys"])
    if not keys:
        raise BadDataError(f"{bad_data.summary()}: nothing to cache")
    if bad_data.total:
        log.warning(bad_data.summary())
    return keys, torch.cat(chunks)
