"""Tiny training runs: the tiny world's sizes, run configs, the train command, final weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import threetowers as tt

TINY_WORLD = {
    "train_pairs": 256,
    "val_pairs": 32,
    "retrieval_test": 40,
    "retrieval_val": 20,
    "zeroshot_per_class": 4,
    "zeroshot_val_per_class": 2,
    "pretrain_objects_per_class": 10,
    "pretrain_scenes_per_class": 10,
    "shard_size": 64,
    "workers": 1,
}


def tiny_run_config(world_dir: Path, cache_dir: Path, *overrides: str) -> tt.Config:
    base = [
        "model.embed_dim=32",
        "model.image.image_size=32",
        "model.image.patch_size=8",
        "model.image.width=64",
        "model.image.depth=2",
        "model.image.heads=2",
        "model.text.vocab_size=300",
        "model.text.context_length=32",
        "model.text.width=64",
        "model.text.depth=2",
        "model.text.heads=2",
        "model.frozen.0.image_size=64",
        f"data.world.dir={world_dir}",
        f"data.cache_dir={cache_dir}",
        "data.batch_size=32",
        "data.num_workers=0",
        "train.warmup_steps=2",
        "train.log_every=1",
    ]
    base += [f"data.world.{k}={v}" for k, v in TINY_WORLD.items()]
    return tt.load_config(None, base + list(overrides))


def write_config(cfg: tt.Config, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def clip_run_config(world_dir: Path, tmp_path: Path, *overrides: str) -> tuple[tt.Config, Path]:
    """A tiny CLIP run's config, and the file it is written to (for the command line)."""
    cfg = tiny_run_config(world_dir, tmp_path / "cache", "model.mode=clip", *overrides)
    return cfg, write_config(cfg, tmp_path / "run.yaml")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(str(last / "model.safetensors"))


TRAIN_ENV = dict(os.environ, OMP_NUM_THREADS="2")  # one thread count: the same rounding


def train_command(config: Path, run: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "threetowers",
        "train",
        str(config),
        "--quiet",
        "--run-dir",
        str(run),
    ]
