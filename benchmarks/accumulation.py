"""Peak memory and step time against the micro-batch size at a fixed global batch, with and
without activation checkpointing (issue 41), on the CPU.

A clip step of 256 pairs (ViT and text Transformer of width 256, depth 6, 64 px images,
context 32) through ``trainer.step.TrainStep``, each setting in a fresh process: the step's
median time over 3 steps after one warm-up, and its memory (the process's peak resident set
over the steps less what it held before the first: the activations, and the gradients and
Adam's state, the same in every setting). The whole-batch step without checkpointing is the
reference of every ratio.

    .venv/bin/python benchmarks/accumulation.py [--out benchmarks/results/accumulation.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from matmul import peak_matmul_gflops  # noqa: E402

BATCH, SIZE, CONTEXT = 256, 64, 32
MICRO_BATCHES = (0, 128, 64, 32)  # 0: the whole batch at once
TOWERS = [
    "model.mode=clip",
    f"model.image.image_size={SIZE}",
    "model.image.patch_size=8",
    "model.image.width=256",
    "model.image.depth=6",
    "model.image.heads=4",
    "model.text.width=256",
    "model.text.depth=6",
    "model.text.heads=4",
    f"model.text.context_length={CONTEXT}",
    "model.text.vocab_size=1000",
    f"data.batch_size={BATCH}",
    "train.device=cpu",
    "train.precision=fp32",
]


def measure(micro_batch: int, checkpointing: bool) -> dict:
    """One setting's step: median seconds and peak memory above the step's start (MiB)."""
    import threetowers as tt
    from threetowers.data.stream import GlobalBatch
    from threetowers.trainer.optim import make_optimizer
    from threetowers.trainer.step import TrainStep

    torch.set_num_threads(2)
    overrides = [f"train.micro_batch={micro_batch}"]
    overrides.append(f"train.activation_checkpointing={str(checkpointing).lower()}")
    cfg = tt.load_config(None, [*TOWERS, *overrides])
    torch.manual_seed(0)
    model = tt.build_model(cfg)
    optimizer, schedule = make_optimizer(model, 1e-4, 0.1, 1, 100)
    step = TrainStep(model, optimizer, schedule, torch.device("cpu"), cfg.train)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "images": torch.randn(BATCH, 3, SIZE, SIZE, generator=generator),
        "tokens": torch.randint(4, 1000, (BATCH, CONTEXT), generator=generator),
        "captions": [""] * BATCH,
    }
    batch = GlobalBatch(tensors, [BATCH], False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(batch)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_seconds": statistics.median(times), "peak_rss_kib": peak, "before_kib": before}


def _in_process(micro_batch: int, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--measure", str(micro_batch), str(int(checkpointing))]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/accumulation.json"))
    parser.add_argument("--measure", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # a child: one setting, its JSON on the last line
        print(json.dumps(measure(args.measure[0], bool(args.measure[1]))))
        return
    torch.set_num_threads(2)
    report: dict = {
        "device": "cpu",
        "threads": 2,
        "peak_fp32_gflops": round(peak_matmul_gflops(torch.device("cpu")), 1),
        "global_batch": BATCH,
        "towers": TOWERS,
        "settings": [],
    }
    for checkpointing in (False, True):
        for micro_batch in MICRO_BATCHES:
            measured = _in_process(micro_batch, checkpointing)
            report["settings"].append(
                {
                    "micro_batch": micro_batch or BATCH,
                    "activation_checkpointing": checkpointing,
                    "step_seconds": round(measured["step_seconds"], 3),
                    # the peak resident set above the process before its first step
                    "step_memory_mib": round(
                        (measured["peak_rss_kib"] - measured["before_kib"]) / 1024, 1
                    ),
                }
            )
    reference = report["settings"][0]
    for setting in report["settings"]:
        setting["time_vs_whole"] = round(setting["step_seconds"] / reference["step_seconds"], 3)
        setting["memory_vs_whole"] = round(
            setting["step_memory_mib"] / max(reference["step_memory_mib"], 1e-9), 3
        )
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
