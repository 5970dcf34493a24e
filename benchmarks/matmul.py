"""The machine's peak matmul throughput: the denominator of MFU, measured, not quoted."""

from __future__ import annotations

import statistics
import time

import torch


def peak_matmul_gflops(
    device: torch.device, size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32
) -> float:
    """Median GFLOP/s of a square matmul in ``dtype`` (fp32 by default; bf16 is a GPU's
    tensor-core peak, the denominator of a bf16 run's MFU), large enough to reach the
    BLAS's best: 2048 on a CPU, ~8192 on a GPU."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9
