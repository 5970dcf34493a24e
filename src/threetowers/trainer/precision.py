"""A run's arithmetic: ``train.precision`` resolved for its device, the autocast it implies,
and the TF32 tensor cores a CUDA run uses for what stays float32.

``auto`` is bf16 autocast on CUDA (its tensor cores run bf16 many times faster than float32)
and fp32 elsewhere: CPUs without bf16 units run autocast slower than float32, and a CPU
run's numbers stay those of the code before ``auto`` existed.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch

Resolved = Literal["fp32", "bf16"]


def resolve_precision(precision: str, device: torch.device | str) -> Resolved:
    """What ``train.precision`` (auto, fp32 or bf16) means on ``device``."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device):
    """The context a step's forward and loss run in: bf16 autocast, or none (fp32)."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def use_tf32(device: torch.device) -> None:
    """On CUDA, float32 matmuls and cuDNN convolutions on TF32 tensor cores (10-bit
    mantissa, float32 range): what autocast leaves in float32, and all of an fp32 run.
    Process-wide, so called once at a training run's start; the CPU's kernels are untouched
    (``torch.set_float32_matmul_precision`` would reach the CPU's oneDNN matmuls too)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
