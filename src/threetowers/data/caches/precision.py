"""How the frozen towers compute while their caches are built (``data.cache_precision``):
fp32, or bf16 autocast. Either way the rows are stored as ``data.cache_dtype`` says.

bf16 changes the features (by bf16's ~3 significant digits), so a bf16-built cache lives in a
folder of its own (``CacheSpec.folder``) and is never read as an fp32 one; fp32 caches keep
the names they had before precision was a choice.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

log = logging.getLogger(__name__)

CachePrecision = Literal["fp32", "bf16"]


def tower_precision(precision: str, device: torch.device) -> AbstractContextManager:
    """The context a cache build runs its towers on ``device`` in. bf16 is meant for CUDA;
    on a CPU it is autocast too, with a warning: CPUs with bf16 instructions run it faster
    than fp32 (EfficientNet-Lite0 in 0.6x, MiniLM in 0.2x of fp32's time on the reference
    machine, AVX512-BF16), others emulate it."""
    if precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        log.warning(
            "data.cache_precision=%s on the %s: bf16 autocast is fast only on CPUs with bf16 "
            "instructions (AVX512-BF16, AMX), emulated and slower than fp32 on others; set "
            "data.cache_precision=fp32 if this build crawls",
            precision,
            device.type,
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)
