"""The input path on real-resolution JPEGs: training's loader against a naive PIL loader.

Shards of real photographs (scikit-image's, cropped at random to a short side of 256-512 px,
JPEG quality 90) feed, in turns within one run:

- **training's path** (``TrainingData.batches``: the loader workers' decode, random resized
  crop to 224 px, uint8 batches; normalisation and tokenisation in the main process), the
  model a CLIP at 224 px that is built but never run;
- **a naive loader**: 2 DataLoader workers, each a share of the shards; every JPEG decoded
  at full size, a random resized crop to 224 px, float32 normalisation in the worker.

Both read one epoch with 2 workers. Reported: pairs/s (the best of the rounds) and the main
process's own CPU time per sample (``time.process_time``: collation, normalisation,
tokenisation; the model's step excluded because there is none). Issue 40's goals are ratios
to the naive loader in the same run: at least 1.5x its pairs/s, at most 50 us per sample.

    .venv/bin/python benchmarks/input_path.py [--samples 3200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from matmul import peak_matmul_gflops  # noqa: E402

import threetowers as tt  # noqa: E402
from threetowers.data.pipeline import TrainingData, open_data  # noqa: E402
from threetowers.trainer.start import towers_of  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
SIZE, BATCH, WORKERS, SHARD = 224, 64, 2, 200
MEAN, STD = np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])


def write_shards(out: Path, samples: int, seed: int = 0) -> dict:
    """``samples`` random crops of the photos as JPEG shards; their sizes' summary."""
    from skimage import data

    rng = random.Random(seed)
    photos = [Image.fromarray(getattr(data, name)()) for name in PHOTOS]
    out.mkdir(parents=True)
    shorts, nbytes = [], 0
    for first in range(0, samples, SHARD):
        with tarfile.open(out / f"photos-{first // SHARD:05d}.tar", "w") as tar:
            for index in range(first, min(first + SHARD, samples)):
                jpeg = _crop(rng.choice(photos), rng)
                shorts.append(min(jpeg.size))
                buffer = io.BytesIO()
                jpeg.save(buffer, "JPEG", quality=90)
                nbytes += buffer.tell()
                caption = f"photograph {index} of the set".encode()
                for suffix, payload in (("jpg", buffer.getvalue()), ("txt", caption)):
                    member = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    return {"short_side": [min(shorts), max(shorts)], "mean_jpeg_kib": nbytes / samples / 1024}


def _crop(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A crop with a short side of 256-512 px and an aspect of 1-1.5, randomly oriented."""
    short = rng.randint(256, 512)
    long = int(short * rng.uniform(1.0, 1.5))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    scale = max(width / photo.width, height / photo.height, 1.0) * rng.uniform(1.0, 1.3)
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), 3)
    left = rng.randint(0, photo.width - width)
    top = rng.randint(0, photo.height - height)
    return photo.crop((left, top, left + width, top + height))


def training_path(shards: Path, run_dir: Path) -> tuple[int, float, float]:
    """One epoch of training's batches: (samples, seconds, main-process CPU seconds)."""
    cfg = tt.load_config(
        None,
        [
            "model.mode=clip",
            f"model.image.image_size={SIZE}",
            "model.image.patch_size=16",
            "model.image.width=64",
            "model.image.depth=1",
            "model.image.heads=2",
            "model.text.width=64",
            "model.text.depth=1",
            "model.text.heads=2",
            "model.text.vocab_size=512",
            f"data.train={shards}",
            f"data.batch_size={BATCH}",
            f"data.num_workers={WORKERS}",
        ],
    )
    model = tt.build_model(cfg)
    data = TrainingData(cfg, open_data(cfg, run_dir), towers_of(model), progress=False)
    return _epoch(data.batches(0, 0), lambda batch: len(batch["ids"]))


def naive_path(shards: Path) -> tuple[int, float, float]:
    """One epoch of the naive loader: (samples, seconds, main-process CPU seconds)."""
    loader = torch.utils.data.DataLoader(
        _NaiveShards(sorted(shards.glob("*.tar"))), batch_size=BATCH, num_workers=WORKERS
    )
    return _epoch(loader, lambda batch: len(batch[0]))


def _epoch(batches, size) -> tuple[int, float, float]:
    """(samples, seconds, main-process CPU seconds) of an epoch after its first batch, which
    waits for the workers to start: a one-off cost, not throughput."""
    iterator = iter(batches)
    next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    samples = sum(size(batch) for batch in iterator)
    return samples, time.perf_counter() - wall, time.process_time() - cpu


class _NaiveShards(torch.utils.data.IterableDataset):
    def __init__(self, shards: list[Path]) -> None:
        self.shards = shards

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        rng = random.Random(info.id if info else 0)
        for shard in mine:
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers()}
                for name in sorted(n for n in members if n.endswith(".jpg")):
                    image = Image.open(tar.extractfile(members[name])).convert("RGB")
                    caption = tar.extractfile(members[name[:-3] + "txt"]).read().decode()
                    yield _normalised(_random_resized_crop(image, rng)), caption


def _random_resized_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    area = image.width * image.height * rng.uniform(0.6, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    width = min(image.width, round((area * ratio) ** 0.5))
    height = min(image.height, round((area / ratio) ** 0.5))
    left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    return image.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + width, top + height))


def _normalised(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(((pixels - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/input_path.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    peak = peak_matmul_gflops(torch.device("cpu"))
    results: dict[str, list] = {"training": [], "naive": []}
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch) / "shards"
        made = write_shards(shards, args.samples)
        for round_ in range(args.rounds):  # in turns, so that a slower moment hits both
            run_dir = Path(scratch) / f"run{round_}"
            results["training"].append(training_path(shards, run_dir))
            results["naive"].append(naive_path(shards))
    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "peak_fp32_gflops": round(peak, 1),
        "samples": args.samples,
        "workers": WORKERS,
        "batch_size": BATCH,
        "image_size": SIZE,
        **made,
    }
    for path, runs in results.items():
        samples, seconds, cpu = max(runs, key=lambda run: run[0] / run[1])
        report[path] = {
            "pairs_per_s": round(samples / seconds, 1),
            "main_process_us_per_sample": round(cpu / samples * 1e6, 1),
            "rounds": [[s, round(w, 3), round(c, 3)] for s, w, c in runs],
        }
    report["training_vs_naive_pairs_per_s"] = round(
        report["training"]["pairs_per_s"] / report["naive"]["pairs_per_s"], 3
    )
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
