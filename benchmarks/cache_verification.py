"""What checking every feature-cache unit's sha256 at a run's start costs (issue 37, item 5).

    .venv/bin/python benchmarks/cache_verification.py [--samples 20000]
        [--out benchmarks/results/cache_verification.json]

Synthetic shards (16 px PNGs) are cached with EfficientNet-Lite0 (1280-d float16 features,
32 px input) once; then the start of a run's cache step (``build_caches`` finding every unit
complete) is timed with the checksums checked, as every build does now, and with the check
replaced by the stored digest (what starts cost before). Reported as ratios within this run:
the check against the build it protects, and sha256's throughput from the page cache with
the seconds it implies for CC3M-sized caches (3.3M samples). The peak fp32 matmul measured
here is context only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))

import matmul  # noqa: E402
from feature_cache import config, write_shards  # noqa: E402

from threetowers.config import load_config  # noqa: E402
from threetowers.data.caches import layout  # noqa: E402
from threetowers.data.caches.features import build_caches  # noqa: E402
from threetowers.data.caches.layout import CacheSpec  # noqa: E402
from threetowers.data.caches.units import dataset_units  # noqa: E402
from threetowers.data.sources.pairs import open_pairs  # noqa: E402
from threetowers.model.build import build_frozen_towers  # noqa: E402

FEATURE_BYTES = 1280 * 2  # one EfficientNet-Lite0 feature vector in float16
CC3M = 3_300_000


def _timed(function, repeats: int) -> float:
    """Median seconds of ``function()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sha256_gb_per_s(size: int = 256 << 20) -> float:
    data = os.urandom(size)
    return size / _timed(lambda: hashlib.sha256(data).hexdigest(), 5) / 1e9


def measure(samples: int, root: Path) -> dict:
    shards = write_shards(root / "shards", samples)
    cfg = load_config(config(root, shards, towers=1, cache_dtype="float16"))
    towers = build_frozen_towers(cfg.model)  # EfficientNet-Lite0 at 32 px, as feature_cache.py
    tower = next(iter(towers.values()))
    units = dataset_units(open_pairs(shards))
    spec = CacheSpec(cfg.data.cache_dir, cfg.data.cache_dtype)

    def build() -> None:
        build_caches(towers, units, spec, batch_size=256, num_workers=1, progress=False)

    build_seconds = _timed(build, 1)  # computes every unit
    checked = _timed(build, 5)  # every unit complete: its bytes hashed against the index
    recorded = {}

    def stored_digest(path: Path) -> str:  # what a start cost before the check existed
        return recorded[str(path)]

    for unit in spec.folder(tower)[0].glob("*.json"):
        recorded[str(unit.with_suffix(".npy"))] = json.loads(unit.read_text())["sha256"]
    with mock.patch.object(layout, "file_sha256", stored_digest):
        unchecked = _timed(build, 5)
    cache_bytes = sum(p.stat().st_size for p in spec.folder(tower)[0].glob("*.npy"))
    return {
        "samples": samples,
        "units": len(units),
        "cache_mib": cache_bytes / 2**20,
        "build_seconds": build_seconds,
        "start_checked_seconds": checked,
        "start_unchecked_seconds": unchecked,
        "check_seconds": checked - unchecked,
        "check_over_build": (checked - unchecked) / build_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--out", default="benchmarks/results/cache_verification.json")
    args = parser.parse_args()
    peak = matmul.peak_matmul_gflops(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as root:
        result = measure(args.samples, Path(root))
    throughput = sha256_gb_per_s()
    result |= {
        "peak_matmul_gflops": peak,
        "threads": torch.get_num_threads(),
        "sha256_gb_per_s": throughput,
        "cc3m_check_seconds_from_page_cache": CC3M * FEATURE_BYTES / (throughput * 1e9),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
