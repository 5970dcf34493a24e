"""Fault injection: 5% corrupt data and two SIGKILLs at random moments change nothing.

A real ``threetowers train`` process on shards with exactly 5% corrupt samples (every kind of
bad sample the loader knows, spread by a seeded shuffle) is killed with SIGKILL twice at
seeded random moments - between steps, inside a checkpoint write, wherever the moment falls -
and re-run to completion. It must end with the weights of an uninterrupted run on the same
data, report exactly the injected number of skipped samples, by reason, and leave no
temporary or partial file behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds
import yaml
from safetensors.torch import load_file

from tests.helpers.bad_data import BAD, JPEG, bomb_png
from tests.helpers.images import COLOURS, SHAPES, picture
from threetowers.files.checkpoints import load_checkpoint

SHARDS, PER_SHARD, BATCH, WORKERS = 4, 80, 8, 2
SAMPLES = SHARDS * PER_SHARD


def without(sample: dict, member: str) -> dict:
    return {k: v for k, v in sample.items() if k != member}


# name -> (how a good sample is damaged, the reason it must be skipped for)
CORRUPTIONS = {
    "truncated_jpeg": (
        lambda s: without(s, "png") | {"jpg": JPEG[: len(JPEG) // 2]},
        "undecodable_image",
    ),
    "zero_bytes": (lambda s: s | {"png": b""}, "undecodable_image"),
    "bomb": (lambda s: s | {"png": bomb_png()}, "oversized_image"),
    "no_image": (lambda s: without(s, "png"), "no_image"),
    "no_caption": (lambda s: without(s, "txt"), "no_caption"),
    "blank_caption": (lambda s: s | {"txt": b"  \n"}, "empty_caption"),
    "overlong_caption": (lambda s: s | {"txt": BAD["overlong_caption"][1]}, "overlong_caption"),
    "latin1_caption": (lambda s: s | {"txt": BAD["latin1_caption"][1]}, "caption_not_utf8"),
}
# Two of each kind: 16 of 320 samples, 5%.
INJECTED = Counter(reason for _, reason in CORRUPTIONS.values() for _copy in range(2))
# Every worker reads whole batches of its 2 shards (160 samples), so one epoch is exactly
# 40 steps and every sample, bad ones included, is visited exactly once.
STEPS = SAMPLES // BATCH


def write_corrupt_shards(folder: Path) -> None:
    kinds = [name for name in CORRUPTIONS for _ in range(2)]
    slots = random.Random(5).sample(range(SAMPLES), len(kinds))
    corrupt = dict(zip(slots, kinds, strict=True))
    folder.mkdir()
    for shard in range(SHARDS):
        with wds.TarWriter(str(folder / f"train-{shard:06d}.tar")) as sink:
            for index in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                caption = f"a {COLOURS[index % 4]} {SHAPES[index // 4 % 4]}".encode()
                sample = {"__key__": f"s{index:05d}", "png": picture(index), "txt": caption}
                if index in corrupt:
                    damage, _ = CORRUPTIONS[corrupt[index]]
                    sample = damage(sample)
                sink.write(sample)


def run_config(root: Path) -> Path:
    config = {
        "model": {
            "mode": "clip",
            "embed_dim": 16,
            "image": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
            "text": {"vocab_size": 120, "context_length": 8, "width": 32, "depth": 1, "heads": 2},
        },
        "data": {
            "train": str(root / "shards"),
            "batch_size": BATCH,
            "num_workers": WORKERS,
            "shuffle_buffer": 16,
            "max_bad_fraction": 0.1,  # above the 5% injected
            "cache_dir": str(root / "cache"),
        },
        "train": {
            "steps": STEPS,
            "warmup_steps": 2,
            "checkpoint_every": 3,
            "keep_checkpoints": 2,
            "log_every": 1,
            "device": "cpu",
        },
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0
    lines = metrics.read_text().splitlines()
    return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)


def test_corrupt_data_and_two_sigkills_give_the_uninterrupted_weights_and_counts(tmp_path):
    write_corrupt_shards(tmp_path / "shards")
    config = run_config(tmp_path)
    command = [sys.executable, "-m", "threetowers", "train", str(config), "--quiet", "--run-dir"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(["src", "."]))

    def run_to_the_end(run: Path) -> str:
        done = subprocess.run(command + [str(run)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stderr

    straight = tmp_path / "straight"
    run_to_the_end(straight)

    rng = random.Random(2024)
    interrupted = tmp_path / "interrupted"
    for low, high in ((2, 14), (18, 34)):  # a step to wait for, then a random instant
        target, delay = rng.randint(low, high), rng.uniform(0.0, 0.15)
        process = subprocess.Popen(command + [str(interrupted)], env=env, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while logged_steps(interrupted) < target:
            assert process.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        assert process.poll() is None, "training ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    log = run_to_the_end(interrupted)

    # The same weights as the uninterrupted run, bit for bit.
    expected, got = final_weights(straight), final_weights(interrupted)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    # Exactly the injected bad samples, by reason, in metrics.jsonl and in the log.
    for run in (straight, interrupted):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
        last = [r for r in records if "loss" in r][-1]
        assert last["data/bad_samples"] == sum(INJECTED.values()) == SAMPLES // 20
        assert last["data/samples"] == SAMPLES
        reasons = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("data/bad_")}
        assert reasons == dict(INJECTED) | {"bad_samples": 16}
    assert f"skipped 16 bad of {SAMPLES} samples" in log

    # Nothing temporary or partial is left; every checkpoint left is whole.
    leftovers = [p for p in interrupted.rglob("*") if ".tmp-" in p.name]
    assert not leftovers
    checkpoints = sorted((interrupted / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"]
    for checkpoint in checkpoints:
        load_checkpoint(checkpoint)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))
