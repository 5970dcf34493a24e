"""The input path on real-resolution JPEGs: training's loader now, as it was before issue
40, and a naive PIL loader.

Shards of real photographs (scikit-image's, cropped at random to a short side of 256-512 px,
JPEG quality 90) feed, in turns within one run, each in a fresh process:

- **training** (``TrainingData.stream``: the loader workers decode each JPEG at the
  smallest scale that covers its random resized crop to 224 px and hand uint8 batches,
  tokenised, through one loader for all epochs), the model a CLIP at 224 px that is built
  but never run; the batches are what goes to the device, which normalises them
  (``data/device.py``, timed apart: on a CPU device it is the device's work);
- **before**: the same from the code before issue 40 (``--before COMMIT``, a git worktree):
  full decodes, tokenising and the float normalisation in the main process, a loader per
  epoch;
- **naive**: 2 DataLoader workers, each a share of the shards; every JPEG decoded at full
  size, a random resized crop to 224 px with the model's filter (bicubic), float32
  normalisation in the worker; ``naive_bilinear``: the same with a bilinear filter (the
  baseline's first version), which costs less.

Two cases: one epoch of ``--samples``, and 4 epochs of a fifth as many, where the epochs'
starts weigh. Each path reads with 2 workers. Reported: pairs/s after the first batch (the
best of the rounds) and the main process's own CPU time per sample (``time.process_time``:
receiving the batches, and before issue 40 tokenising and normalising; no model step).
Issue 40's goals are ratios to the naive loader in the same run: at least 1.5x its pairs/s,
at most 50 us per sample. Also reported: the normalisation's cost on a CPU device, and what
decoding at a smaller scale does to the pixels of the crops.

    .venv/bin/python benchmarks/input_path.py [--samples 3200] [--rounds 3] [--before REF]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import subprocess
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


def training_path(shards: Path, run_dir: Path, epochs: int) -> tuple[int, float, float]:
    """``epochs`` epochs of training's batches: (samples, seconds, main-process CPU seconds);
    through its one stream where it has one, else (before issue 40) an epoch at a time."""
    import threetowers as tt
    from threetowers.data.pipeline import TrainingData, open_data
    from threetowers.trainer.start import towers_of

    data_keys = [f"data.train={shards}", f"data.batch_size={BATCH}", f"data.num_workers={WORKERS}"]
    cfg = tt.load_config(None, [*MODEL, *data_keys])
    model = tt.build_model(cfg)
    data = TrainingData(cfg, open_data(cfg, run_dir), towers_of(model), progress=False)
    if hasattr(data, "stream"):
        batches = itertools.takewhile(lambda b: b["position"][0] < epochs, data.stream(0, 0))
    else:
        batches = (batch for epoch in range(epochs) for batch in data.batches(epoch, 0))
    return _timed(batches, lambda batch: len(batch["ids"]))


MODEL = [
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
]


def naive_path(shards: Path, resample: int, epochs: int) -> tuple[int, float, float]:
    """``epochs`` epochs of the naive loader: (samples, seconds, main-process CPU seconds)."""
    loader = torch.utils.data.DataLoader(
        _NaiveShards(sorted(shards.glob("*.tar")), resample),
        batch_size=BATCH,
        num_workers=WORKERS,
    )
    batches = (batch for _ in range(epochs) for batch in loader)
    return _timed(batches, lambda batch: len(batch[0]))


def _timed(batches, size) -> tuple[int, float, float]:
    """(samples, seconds, main-process CPU seconds) after the first batch, which waits for
    the workers to start: a one-off cost, not throughput."""
    iterator = iter(batches)
    next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    samples = sum(size(batch) for batch in iterator)
    return samples, time.perf_counter() - wall, time.process_time() - cpu


class _NaiveShards(torch.utils.data.IterableDataset):
    def __init__(self, shards: list[Path], resample: int) -> None:
        self.shards, self.resample = shards, resample

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
                    crop = _random_resized_crop(image, rng, self.resample)
                    yield _normalised(crop), caption


def _random_resized_crop(image: Image.Image, rng: random.Random, resample: int) -> Image.Image:
    area = image.width * image.height * rng.uniform(0.6, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    width = min(image.width, round((area * ratio) ** 0.5))
    height = min(image.height, round((area / ratio) ** 0.5))
    left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    return image.resize((SIZE, SIZE), resample, box=(left, top, left + width, top + height))


def _normalised(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(((pixels - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)


def normalisation_us_per_sample() -> float:
    """The normalisation of a uint8 batch on a CPU device (the device's work there)."""
    from threetowers.backbones.frozen import Preprocessing

    pixels = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    normalise = Preprocessing(SIZE, (0.5,) * 3, (0.5,) * 3).normalize_pixels
    normalise(pixels)
    start = time.perf_counter()
    for _ in range(10):
        normalise(pixels)
    return (time.perf_counter() - start) / (10 * BATCH) * 1e6


def draft_pixels(shards: Path, samples: int = 200) -> dict:
    """Training's crops decoded at the smallest covering scale against the same crops of the
    full decode: how many were decoded smaller, and how far their pixels moved (0-255)."""
    from threetowers.backbones.frozen import Preprocessing
    from threetowers.data.sources.decode import EncodedImage, load_image
    from threetowers.data.transforms import PixelTrainTransform

    crop = PixelTrainTransform(Preprocessing(SIZE, (0.5,) * 3, (0.5,) * 3))
    drafted, diffs = 0, []
    with tarfile.open(next(iter(sorted(shards.glob("*.tar"))))) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    for index, jpeg in enumerate(jpegs[:samples]):
        encoded = EncodedImage(jpeg, "bench")
        small = crop(encoded, np.random.default_rng(index)).float()
        full = crop(load_image(jpeg, "bench"), np.random.default_rng(index)).float()
        drafted += encoded.decoded((1, 1))[1] < 1
        diffs.append((small - full).abs())
    stacked = torch.stack(diffs)
    return {
        "crops": len(diffs),
        "decoded_smaller": int(drafted),
        "mean_abs_difference": round(float(stacked.mean()), 3),
        "mean_abs_difference_of_those": round(
            float(sum(d.mean() for d in diffs) / max(1, int(drafted))), 3
        ),
        "max_abs_difference": float(stacked.max()),
    }


def measure(path: str, shards: Path, run_dir: Path, epochs: int) -> tuple[int, float, float]:
    torch.set_num_threads(2)
    if path in ("training", "before"):
        return training_path(shards, run_dir, epochs)
    return naive_path(shards, Image.BICUBIC if path == "naive" else Image.BILINEAR, epochs)


def _in_process(path: str, shards: Path, run_dir: Path, source: Path, epochs: int) -> tuple:
    """``measure`` in a fresh process (``source``: the threetowers it imports)."""
    env = os.environ | {"PYTHONPATH": str(source)}
    where = [str(shards), str(run_dir), str(epochs)]
    command = [sys.executable, __file__, "--measure", path, *where]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def _worktree(ref: str, where: Path) -> Path:
    """The project's source at ``ref``, checked out in ``where``."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(where), ref])
    return where / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="91a815e", help="the commit before issue 40")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/input_path.json"))
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # a child: one measurement, its JSON on the last line
        path, shards, run_dir, epochs = args.measure
        print(json.dumps(measure(path, Path(shards), Path(run_dir), int(epochs))))
        return
    torch.set_num_threads(2)
    peak = peak_matmul_gflops(torch.device("cpu"))
    here = Path(__file__).resolve().parent.parent / "src"
    # one epoch of many samples; several epochs of few, where epochs' starts weigh
    scenarios = {"one_epoch": (args.samples, 1), "epochs": (args.samples // 5, 4)}
    report: dict = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "peak_fp32_gflops": round(peak, 1),
        "workers": WORKERS,
        "batch_size": BATCH,
        "image_size": SIZE,
        "before": args.before,
    }
    with tempfile.TemporaryDirectory() as scratch:
        before = _worktree(args.before, Path(scratch) / "before")
        try:
            for scenario, (samples, epochs) in scenarios.items():
                shards = Path(scratch) / scenario
                made = write_shards(shards, samples)
                runs = {path: [] for path in PATHS}
                for round_ in range(args.rounds):  # in turns: a slower moment hits all
                    for path in PATHS:
                        source = before if path == "before" else here
                        run_dir = Path(scratch) / f"{scenario}-{path}{round_}"
                        runs[path].append(_in_process(path, shards, run_dir, source, epochs))
                report[scenario] = {"samples": samples, "epochs": epochs, **made}
                report[scenario] |= _summary(runs)
            report["decoded_at_a_smaller_scale"] = draft_pixels(Path(scratch) / "one_epoch")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before.parent)])
    report["cpu_device_normalisation_us_per_sample"] = round(normalisation_us_per_sample(), 1)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


PATHS = ("training", "before", "naive", "naive_bilinear")


def _summary(runs: dict[str, list]) -> dict:
    """Each path's best round (pairs/s, main-process us per sample) and training's ratios."""
    out = {}
    for path, rounds in runs.items():
        samples, seconds, cpu = max(rounds, key=lambda run: run[0] / run[1])
        out[path] = {
            "pairs_per_s": round(samples / seconds, 1),
            "main_process_us_per_sample": round(cpu / samples * 1e6, 1),
            "rounds": [[s, round(w, 3), round(c, 3)] for s, w, c in rounds],
        }
    for path in PATHS[1:]:
        ratio = out["training"]["pairs_per_s"] / out[path]["pairs_per_s"]
        out[f"training_vs_{path}_pairs_per_s"] = round(ratio, 3)
    return out


if __name__ == "__main__":
    main()
