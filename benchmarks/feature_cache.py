"""Feature caches at scale: training's peak memory against dataset size, the cost of
building caches, and the cost of a second cached frozen tower.

    .venv/bin/python benchmarks/feature_cache.py [--sizes 20000 80000 320000]
        [--baseline-src OLD/src] [--out benchmarks/results/feature_cache.json]

Synthetic shards (16 px PNGs, one caption each) of each size are cached with
EfficientNet-Lite0 (1280-d features, 32 px input) by ``threetowers cache``, then a 3t run of
a fixed number of steps trains on them. Each command runs in its own process; its peak
resident memory is the largest of the process itself and its loader workers (their
``ru_maxrss``). ``--baseline-src`` runs the same commands on another checkout's package (the
code before per-shard caches, which held a whole cache in memory) for the side-by-side.
Times are reported as ratios within this run, and as images/s normalised to a 160 GFLOP/s
peak fp32 matmul measured here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import matmul  # noqa: E402
import step  # noqa: E402

import threetowers as tt  # noqa: E402

SHARD_SIZE = 5000
REFERENCE_PEAK = 160.0  # GFLOP/s: times are normalised to this peak
STEPS = 40
# Runs the command in this process and prints its peak memory and that of its workers.
MEASURED = """
import json, resource, sys
from threetowers.cli import main
code = main(sys.argv[1:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("PEAK_RSS_KB " + json.dumps({"self": own, "workers": workers}))
sys.exit(code)
"""


def write_shards(folder: Path, samples: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(samples)
    for shard in range(-(-samples // SHARD_SIZE)):
        path = folder / f"part-{shard:05d}.tar"
        if path.exists():
            continue
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * SHARD_SIZE, min(samples, (shard + 1) * SHARD_SIZE)):
                buffer = io.BytesIO()
                pixels = noise.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, "PNG")
                caption = f"picture {i % 97} of {i % 13} things".encode()
                sink.write({"__key__": f"{i:09d}", "png": buffer.getvalue(), "txt": caption})
    return folder


def config(root: Path, shards: Path, towers: int, cache_dtype: str | None) -> Path:
    frozen = [
        {"name": f"k{i}", "backbone": "efficientnet_lite0", "image_size": 32 + 8 * i}
        for i in range(towers)
    ]
    data = {
        "train": str(shards),
        "batch_size": 256,
        "num_workers": 1,
        "augment": False,
        "cache_dir": str(root / "cache"),
        "max_bad_fraction": 0.0,
    }
    if cache_dtype is not None:  # the baseline knows no such key (it stores float32)
        data["cache_dtype"] = cache_dtype
    raw = {
        "model": {
            "mode": "3t",
            "embed_dim": 32,
            "image": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": {"vocab_size": 256, "context_length": 12, "width": 32, "depth": 1, "heads": 2},
            "frozen": frozen,
        },
        "data": data,
        "train": {"steps": STEPS, "warmup_steps": 2, "log_every": 10, "checkpoint_every": 1000},
    }
    path = root / f"config-{towers}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def threetowers(src: Path, *argv: str) -> dict:
    """Run a command of the package in ``src``: its wall time and peak memory (MiB)."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(torch.get_num_threads()))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *argv], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    peak = json.loads(line.split(" ", 1)[1])
    return {"seconds": seconds, "peak_rss_mib": max(peak.values()) / 1024} | {
        f"rss_{k}_mib": v / 1024 for k, v in peak.items()
    }


def train_rate(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["pairs_per_s"] for r in records if "pairs_per_s" in r][-1]


def memory_against_size(
    label: str, src: Path, root: Path, sizes: list[int], dtype: str | None
) -> list:
    rows = []
    for size in sizes:
        shards = write_shards(root / f"data-{size}", size)
        work = root / f"{label}-{size}"
        work.mkdir(parents=True, exist_ok=True)
        cfg = config(work, shards, towers=1, cache_dtype=dtype)
        cached = threetowers(src, "cache", str(cfg))
        trained = threetowers(src, "train", str(cfg), "--run-dir", str(work / "run"), "--quiet")
        rows.append(
            {
                "pairs": size,
                "cache_seconds": cached["seconds"],
                "cache_images_per_s": size / cached["seconds"],
                "train_peak_rss_mib": trained["peak_rss_mib"],
                "train_rss_main_mib": trained["rss_self_mib"],
                "train_rss_workers_mib": trained["rss_workers_mib"],
                "train_pairs_per_s": train_rate(work / "run"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def two_towers_vs_one(src: Path, root: Path, size: int) -> dict:
    """Building both towers' caches in one pass against one tower's; training with both."""
    shards = write_shards(root / f"data-{size}", size)
    out = {}
    for towers in (1, 2):
        work = root / f"towers-{towers}"
        work.mkdir(parents=True, exist_ok=True)
        cfg = config(work, shards, towers, "float16")
        built = threetowers(src, "cache", str(cfg))
        threetowers(src, "train", str(cfg), "--run-dir", str(work / "run"), "--quiet")
        out[towers] = {"cache_seconds": built["seconds"], "pairs_per_s": train_rate(work / "run")}
    return {
        "pairs": size,
        "cache_seconds_one_tower": out[1]["cache_seconds"],
        "cache_seconds_two_towers": out[2]["cache_seconds"],
        "cache_time_ratio_two_vs_one": out[2]["cache_seconds"] / out[1]["cache_seconds"],
        "train_pairs_per_s_one_tower": out[1]["pairs_per_s"],
        "train_pairs_per_s_two_towers": out[2]["pairs_per_s"],
        "train_time_ratio_two_vs_one": out[1]["pairs_per_s"] / out[2]["pairs_per_s"],
    }


def model_step_two_vs_one(repeats: int = 15) -> dict:
    """The model's step alone (features given), two cached towers against one, in turns."""
    steppers = {}
    for towers in (1, 2):
        frozen = [
            {"name": f"k{i}", "backbone": "efficientnet_lite0", "image_size": 32}
            for i in range(towers)
        ]
        cfg = tt.load_config("tiny", ["data.batch_size=256", f"model.frozen={json.dumps(frozen)}"])
        torch.manual_seed(0)
        model, batch = step._model_and_batch(cfg, "3t_cached", torch.device("cpu"))
        steppers[towers] = step._Stepper(model, batch, torch.device("cpu"))
    times = {1: [], 2: []}
    for round_ in range(repeats + 2):
        for towers, stepper in steppers.items():
            seconds = stepper.timed_step()
            if round_ >= 2:
                times[towers].append(seconds)
    ratios = [two / one for one, two in zip(times[1], times[2], strict=True)]
    return {
        "model_step_seconds_one_tower": statistics.median(times[1]),
        "model_step_seconds_two_towers": statistics.median(times[2]),
        "model_step_ratio_two_vs_one": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000, 320000])
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_cache.json"))
    args = parser.parse_args()
    src = Path(tt.__file__).resolve().parent.parent
    peak = matmul.peak_matmul_gflops(torch.device("cpu"))
    print(f"peak fp32 matmul: {peak:.0f} GFLOP/s", flush=True)
    results: dict = {"peak_matmul_gflops": peak, "steps": STEPS, "shard_size": SHARD_SIZE}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["memory"] = memory_against_size("new", src, root, args.sizes, "float16")
        if args.baseline_src is not None:
            baseline = args.baseline_src.resolve()
            results["baseline_memory"] = memory_against_size(
                "baseline", baseline, root, args.sizes, None
            )
        results["two_towers"] = two_towers_vs_one(src, root, args.sizes[0])
    results |= model_step_two_vs_one()
    first, last = results["memory"][0], results["memory"][-1]
    results["train_peak_rss_ratio_largest_vs_smallest"] = (
        last["train_peak_rss_mib"] / first["train_peak_rss_mib"]
    )
    if "baseline_memory" in results:
        base = results["baseline_memory"]
        results["baseline_train_peak_rss_ratio_largest_vs_smallest"] = (
            base[-1]["train_peak_rss_mib"] / base[0]["train_peak_rss_mib"]
        )
    # The commands' times include starting Python and torch: the build's own rate is the
    # slope between the smallest and the largest dataset.
    extra = last["cache_seconds"] - first["cache_seconds"]
    results["cache_images_per_s_marginal"] = (last["pairs"] - first["pairs"]) / extra
    results["cache_images_per_s_marginal_normalised"] = (
        results["cache_images_per_s_marginal"] * REFERENCE_PEAK / peak
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}, indent=1))


if __name__ == "__main__":
    main()
