"""The two time budgets of issue 19 from their measured parts: ``make demo`` and the full
``threetowers reproduce``, in seconds and normalised to a 160 GFLOP/s peak.

    .venv/bin/python benchmarks/budgets.py [--out FILE]

Every part is the real command on temporary run directories and an empty feature cache:

* the demo: ``threetowers train configs/demo.yaml`` from an empty world and feature cache
  (world generation, h's cache, training, evaluation), then ``threetowers index``; measured
  whole, on all cores, as ``make demo`` runs it (the environment's install is not part);
* the reproduce grid: each kind of job (a CLIP, LiT and 3T run of the reproduce preset, a
  classifier's pretraining, the shared data) runs as the command's workers run them, two
  processes side by side on one core each, once at N1 and once at N2 steps, so a job costs
  ``fixed + steps * per_step`` (setup and evaluation in ``fixed``), contention included. The
  grid's seconds are then every job's cost at its real step count over the two workers:
  a model of the schedule, which assumes the workers are never idle (``reproduce`` keeps
  them busy but for the last job's tail) and leaves out the classifiers' own feature caches,
  so it is a lower bound: 1591 s against the 1698 s the full command took in the same hour.
  The world is ``worlds/default``, generated already. benchmarks/README.md: "Time budgets".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import matmul  # noqa: E402

import threetowers as tt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PEAK = 160.0  # GFLOP/s: the reference machine
SHORT, LONG = 40, 160  # steps of the two measurements of each job
WORKERS = 2  # reproduce.workers' default
COMMAND = [sys.executable, "-m", "threetowers"]


def _timed(*commands: list[str], threads: int | None = None) -> float:
    """Seconds from the start of the commands (started together) to the end of each; their
    mean."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryFile("w+") as errors:
        started = time.perf_counter()
        running = [
            subprocess.Popen(
                COMMAND + c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors
            )
            for c in commands
        ]
        ended: dict[int, float] = {}
        while len(ended) < len(running):
            for i, process in enumerate(running):
                if i not in ended and process.poll() is not None:
                    ended[i] = time.perf_counter() - started
            time.sleep(0.05)
        if any(process.returncode for process in running):
            errors.seek(0)
            raise RuntimeError(f"{' '.join(map(str, commands))} failed:\n{errors.read()[-3000:]}")
    return sum(ended.values()) / len(ended)


def demo(scratch: Path) -> dict:
    """``make demo`` on an empty world and cache: train (world, h's cache, evaluation) and
    index."""
    world, run = scratch / "world", scratch / "demo"
    shared = [f"data.world.dir={world}", f"data.cache_dir={scratch / 'cache'}"]
    train = _timed(["train", "configs/demo.yaml", "--quiet", f"train.run_dir={run}", *shared])
    test_set = world / "retrieval" / "dataset_world.json"
    index = _timed(["index", str(run), "--data", str(test_set), "--out", str(run / "index")])
    return {"train_seconds": train, "index_seconds": index, "seconds": train + index}


def reproduce_jobs(cfg) -> dict[str, tuple[list[str], int, int]]:
    """Kind of job -> (command, its real step count, how many the full grid holds)."""
    r, seeds = cfg.reproduce, cfg.reproduce.seeds
    settings = len(r.settings)
    imagenet = ["model.frozen.0.backbone=efficientnet_lite0"]
    runs = {
        method: (["train", "reproduce", "--quiet", f"model.mode={method}", *imagenet], count)
        for method, count in (("clip", seeds), ("lit", settings * seeds), ("3t", settings * seeds))
    }
    classifiers = sum(1 for s in r.settings if s != "imagenet")
    # both classifiers timed as the scene one: same network and steps, 16.2k vs 18k images
    pretrain = ["pretrain", "reproduce", "--quiet", "pretrain.world_set=scenes"]
    jobs = {name: (command, cfg.train.steps, count) for name, (command, count) in runs.items()}
    return jobs | {"classifier": (pretrain, cfg.pretrain.steps, classifiers)}


def _with_steps(command: list[str], steps: int, out: Path) -> list[str]:
    key = "pretrain" if command[0] == "pretrain" else "train"
    where = f"pretrain.out={out}.safetensors" if key == "pretrain" else f"train.run_dir={out}"
    return [*command, f"{key}.steps={steps}", f"{key}.warmup_steps={steps // 10}", where]


def reproduce(scratch: Path) -> dict:
    """Each job kind's fixed and per-step seconds (two side by side, one core each), the
    shared data's seconds, and the grid's seconds from them."""
    cfg = tt.config.load_experiment_config("reproduce")
    jobs = reproduce_jobs(cfg)
    cache = f"data.cache_dir={scratch / 'cache'}"
    # The shared data, as the grid's first jobs build it: a one-step job of each kind from an
    # empty cache (the first trains the tokenizer; the runs preload their pixels or captions
    # and cache h's features, the classifier decodes its labelled images) costs that over
    # its kind's own fixed cost and step.
    first = scratch / "first-3t"
    once = {"3t": _timed(_with_steps([*jobs["3t"][0], cache], 1, first), threads=1)}
    shared = [cache, f"data.tokenizer={first / 'tokenizer.json'}"]
    for name in ("clip", "lit", "classifier"):
        command = _with_steps([*jobs[name][0], *shared], 1, scratch / f"first-{name}")
        once[name] = _timed(command, threads=1)
    parts: dict = {}
    for name, (command, steps, count) in jobs.items():
        measured = {}
        for n in (SHORT, LONG):
            pair = [
                _with_steps([*command, *shared], n, scratch / f"{name}-{n}-{i}") for i in (0, 1)
            ]
            measured[n] = _timed(*pair, threads=1)
        per_step = (measured[LONG] - measured[SHORT]) / (LONG - SHORT)
        fixed = measured[SHORT] - SHORT * per_step
        parts[name] = {
            "fixed_seconds": fixed,
            "step_seconds": per_step,
            "steps": steps,
            "jobs": count,
        }
    data = sum(
        seconds - parts[name]["fixed_seconds"] - parts[name]["step_seconds"]
        for name, seconds in once.items()
    )
    total = data + sum(
        p["jobs"] * (p["fixed_seconds"] + p["steps"] * p["step_seconds"]) for p in parts.values()
    )
    return parts | {"data_seconds": data, "seconds": total / WORKERS}


def measure() -> dict:
    peak_before = matmul.peak_matmul_gflops(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        out = {"demo": demo(Path(scratch) / "demo"), "reproduce": reproduce(Path(scratch) / "r")}
    peak_after = matmul.peak_matmul_gflops(torch.device("cpu"))
    peak = (peak_before + peak_after) / 2
    scale = peak / REFERENCE_PEAK
    return out | {
        "peak_matmul_gflops": peak,
        "peak_before_after": [peak_before, peak_after],
        "demo_seconds_normalised": out["demo"]["seconds"] * scale,
        "reproduce_seconds_normalised": out["reproduce"]["seconds"] * scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "budgets.json"))
    args = parser.parse_args()
    results = measure()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
