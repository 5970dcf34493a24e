"""Remote shards against local ones: training pairs/s streaming the same shards over loopback
HTTP (curl), through ``pipe:cat`` and from the local files, through ``pair_batches`` with a
realistic example (JPEG decode, a 64 px uint8 view, the caption).

    .venv/bin/python benchmarks/remote_shards.py [--pairs 4000] [--shards 8] [--rounds 5]
        [--out benchmarks/results/remote_shards.json]

The shards (128 px JPEGs of smooth noise, one caption each) are served by ``python -m
http.server`` in its own process on 127.0.0.1. Each round reads one epoch in every mode, in
turn (so drifts of the machine touch all modes alike); a mode's rate is its median over the
rounds, reported as a ratio to local within this run, with the peak fp32 matmul measured
here as context. Counting is timed apart: a cold count streams every shard once over HTTP, a
warm one finds the counts kept (one HEAD request a shard).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import matmul  # noqa: E402

from threetowers.backbones.frozen import Preprocessing  # noqa: E402
from threetowers.data.pipeline import TrainingExample  # noqa: E402
from threetowers.data.sources import shards as shard_sources  # noqa: E402
from threetowers.data.sources.loader import pair_batches  # noqa: E402
from threetowers.data.sources.pairs import open_pairs  # noqa: E402
from threetowers.data.transforms import PixelEvalTransform  # noqa: E402

SIDE = 128
BATCH = 64
WORKERS = 2


def write_shards(folder: Path, pairs: int, shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_shard = -(-pairs // shards)
    paths = []
    for number in range(shards):
        path = folder / f"{number:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(number * per_shard, min(pairs, (number + 1) * per_shard)):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                sink.write(
                    {"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "txt": f"pair {index}"}
                )
        paths.append(path)
    return paths


def serve(folder: Path) -> tuple[subprocess.Popen, int]:
    """``python -m http.server`` on 127.0.0.1, port chosen by the system."""
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (...)"
    return server, int(line.split(" port ")[1].split()[0])


def epoch_rate(source, epoch: int) -> tuple[float, int]:
    example = TrainingExample(image_view=PixelEvalTransform(Preprocessing(64)))
    start = time.perf_counter()
    batches = pair_batches(
        source,
        example=example,
        batch_size=BATCH,
        seed=0,
        epoch=epoch,
        num_workers=WORKERS,
        shuffle_buffer=500,
        drop_last=False,
    )
    pairs = sum(len(batch["ids"]) for batch in batches)
    return pairs / (time.perf_counter() - start), pairs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/remote_shards.json"))
    args = parser.parse_args(argv)
    peak = matmul.peak_matmul_gflops(torch.device("cpu"))  # all threads, before the loader
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loader workers hold the cores
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["THREETOWERS_COUNT_CACHE"] = str(root / "counts")
        paths = write_shards(root / "shards", args.pairs, args.shards)
        server, port = serve(root / "shards")
        try:
            last = f"{args.shards - 1:05d}"
            http = f"http://127.0.0.1:{port}/{{00000..{last}}}.tar"
            start = time.perf_counter()
            assert sum(open_pairs(http).sizes) == args.pairs
            cold = time.perf_counter() - start
            shard_sources._REMOTE_COUNTS.clear()  # as a new process: the count cache alone
            start = time.perf_counter()
            assert sum(open_pairs(http).sizes) == args.pairs
            warm = time.perf_counter() - start
            sources = {
                "local": open_pairs(root / "shards"),
                "http": open_pairs(http),
                "pipe": open_pairs([f"pipe:cat {path}" for path in paths]),
            }
            rates: dict[str, list[float]] = {mode: [] for mode in sources}
            for round_index in range(args.rounds + 1):  # round 0 warms the page cache
                for mode, source in sources.items():
                    rate, pairs = epoch_rate(source, round_index)
                    assert pairs == args.pairs, (mode, pairs)
                    if round_index:
                        rates[mode].append(rate)
        finally:
            server.terminate()
            server.wait()
            torch.set_num_threads(threads)
    median = {mode: statistics.median(values) for mode, values in rates.items()}
    result = {
        "what": "pairs/s through pair_batches (JPEG decode + 64 px uint8 view + caption), "
        "the same shards read locally, over loopback HTTP (curl) and through pipe:cat",
        "pairs": args.pairs,
        "shards": args.shards,
        "image_side": SIDE,
        "batch_size": BATCH,
        "num_workers": WORKERS,
        "rounds": args.rounds,
        "pairs_per_second": {mode: round(value, 1) for mode, value in median.items()},
        "ratio_to_local": {mode: round(median[mode] / median["local"], 3) for mode in median},
        "each_round": {mode: [round(v, 1) for v in values] for mode, values in rates.items()},
        "count_seconds": {"http_cold_streamed": round(cold, 3), "http_warm_cached": round(warm, 3)},
        "peak_matmul_gflops": round(peak, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
