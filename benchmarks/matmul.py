"""The machine's peak fp32 matmul throughput: the denominator of MFU, measured, not quoted."""

from __future__ import annotations

import statistics
import time

import torch


def peak_matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Median GFLOP/s of a square fp32 matmul, large enough to reach the BLAS's best."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    out = torch.empty(size, size, device=device)
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
