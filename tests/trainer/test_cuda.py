"""The GPU paths: training on CUDA in fp32 and bf16 autocast, a CUDA run resumed on CPU, and
torchrun over NCCL. Skipped where no GPU is visible (CI has none); on a GPU machine run
``pytest tests/trainer/test_cuda.py``."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import tiny_run_config, write_config
from threetowers.trainer.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The bundled EfficientNet-Lite0 as live h: its convolutions run on the GPU too.
LIVE_H = ("model.mode=3t", "model.third.backbone=efficientnet_lite0", "data.cache=false")


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def run_on(device: str, world_dir: Path, run: Path, *overrides: str) -> Path:
    cfg = tiny_run_config(
        world_dir, run.parent / "cache", "train.steps=4", f"train.device={device}", *overrides
    )
    return train(cfg, run, progress=False)


def test_cuda_fp32_follows_the_cpu_run(world_dir, tmp_path):
    cpu = losses(run_on("cpu", world_dir, tmp_path / "cpu", *LIVE_H))
    cuda_run = run_on("cuda", world_dir, tmp_path / "cuda", *LIVE_H, "train.precision=fp32")
    cuda = losses(cuda_run)
    # Same data, same initial weights: kernels differ in summation order and in TF32's
    # 10-bit mantissa (matmuls and convolutions), so the first loss agrees closely and the
    # rest stay near.
    assert cuda[0] == pytest.approx(cpu[0], rel=5e-3)
    assert cuda == pytest.approx(cpu, rel=2e-2)
    scores = json.loads((cuda_run / "eval.json").read_text())
    assert all(math.isfinite(scores[k]) for k in ("i2t_R@1", "zeroshot_top1", "fewshot_top1"))


def test_bf16_autocast_trains_near_fp32(world_dir, tmp_path):
    fp32 = losses(run_on("cuda", world_dir, tmp_path / "fp32", *LIVE_H, "train.precision=fp32"))
    bf16 = losses(run_on("cuda", world_dir, tmp_path / "bf16", *LIVE_H))  # auto: bf16 here
    assert all(math.isfinite(loss) for loss in bf16)
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)  # bf16 keeps ~3 significant digits


def test_a_gpu_run_resumes_on_a_cpu_machine(world_dir, tmp_path):
    """train.device=auto is the same config on both machines; the checkpoint's tensors
    (saved from the GPU) must load where no GPU is visible."""
    cfg = tiny_run_config(
        world_dir,
        tmp_path / "cache",
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.precision=fp32",  # auto would change precision with the machine
        *LIVE_H,
    )
    config = write_config(cfg, tmp_path / "run.yaml")
    command = [sys.executable, "-m", "threetowers", "train", str(config), "--quiet", "--run-dir"]
    subprocess.run(command + [str(tmp_path / "gpu")], check=True)
    gpu = losses(tmp_path / "gpu")
    subprocess.run(command + [str(tmp_path / "moved")], check=True)
    shutil.rmtree(tmp_path / "moved" / "checkpoints" / "step_00000004")
    (tmp_path / "moved" / "eval.json").unlink()
    no_gpu = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        command + [str(tmp_path / "moved")], capture_output=True, text=True, env=no_gpu
    )
    assert done.returncode == 0, done.stderr[-3000:]
    moved = losses(tmp_path / "moved")
    assert len(moved) == 4 and moved[:2] == pytest.approx(gpu[:2], rel=1e-5)  # GPU atomics
    assert moved[2:] == pytest.approx(gpu[2:], rel=2e-2)  # steps 3 and 4 ran on the CPU


def test_torchrun_over_nccl(world_dir, tmp_path):
    cfg = tiny_run_config(
        world_dir, tmp_path / "cache", "train.steps=3", "train.device=cuda", *LIVE_H
    )
    config = write_config(cfg, tmp_path / "run.yaml")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        "-m",
        "threetowers",
        "train",
        str(config),
        "--quiet",
        "--run-dir",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(losses(tmp_path / "ddp")) == 3
