"""Peak memory and time of the 3T softmax objective, naive (B x B logits) vs blocked.

Run: .venv/bin/python benchmarks/loss_memory.py [--batches 4096 16384 32768] [--block 1024]
     [--threads N] [--out benchmarks/results/loss.json]

Each (method, B) runs in a fresh subprocess: three softmax terms over five normalised random
(B, D) embeddings that require grad, forward + backward, the median over repeats after a
warm-up of the wall-clock time and of the process's CPU time (which a busy shared machine
disturbs less). Peak memory is measured above what the inputs already hold: on CUDA with
torch.cuda.max_memory_allocated, on CPU as the peak resident set size (Linux VmHWM, reset
after the inputs are made) minus the resident set size then. A naive run whose B x B
matrices would clearly exceed --budget-gb is skipped and recorded as null with the reason.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from threetowers.model.losses import ThreeTowersLoss
from threetowers.model.objective import structure

KEYS = ("z_f", "z_g", "z_fh", "z_gh", "z_h")  # the embeddings of 3T's three terms
# B x B float32 matrices the naive 3T loss holds at its peak: each of the six directions
# saves its log-softmax for the backward, plus the logits and gradients being worked on
# (measured at B = 4096: 9.2 to 10.5).
NAIVE_LIVE_MATRICES = 10


def rss_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(method: str, batch: int, args: argparse.Namespace) -> dict:
    """Time and peak memory of forward + backward in this process (the subprocess side)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    embeddings = {
        k: F.normalize(torch.randn(batch, args.dim, device=device), dim=-1).requires_grad_()
        for k in KEYS
    }
    block_size = args.block if method == "blocked" else 0
    loss_fn = ThreeTowersLoss(structure("3t", ["h"]).terms, block_size=block_size).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from VmRSS
    times, cpu_times = [], []
    for i in range(args.warmup + args.repeats):
        for tensor in [*embeddings.values(), *loss_fn.parameters()]:
            tensor.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        total, _ = loss_fn(embeddings)
        total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = rss_bytes("VmHWM") - baseline
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_bytes": peak,
        "device": device.type,
    }


def run_isolated(method: str, batch: int, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh interpreter, so that no earlier run's peak or cache counts."""
    options = ("dim", "block", "repeats", "warmup", "threads")
    command = [sys.executable, __file__, "--measure", method, str(batch)]
    command += [f"--{name}={getattr(args, name)}" for name in options]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def naive_skip_reason(batch: int, budget_gb: float) -> str | None:
    estimate = NAIVE_LIVE_MATRICES * batch * batch * 4 / 1e9
    if estimate <= budget_gb:
        return None
    return (
        f"would need ~{estimate:.0f} GB ({NAIVE_LIVE_MATRICES} B x B float32 matrices), "
        f"over the {budget_gb:g} GB budget"
    )


def compare(batch: int, args: argparse.Namespace) -> dict:
    """One batch size's record: both methods (null and a reason when skipped), their ratios."""
    record: dict = {"batch": batch}
    reason = naive_skip_reason(batch, args.budget_gb)
    record["naive"] = None if reason else run_isolated("naive", batch, args)
    if reason:
        record["naive_skipped"] = reason
    record["blocked"] = run_isolated("blocked", batch, args)
    for method in ("naive", "blocked"):
        result = record[method]
        shown = (
            f"{result['seconds']:7.2f} s ({result['cpu_seconds']:7.2f} s CPU), "
            f"peak {result['peak_bytes'] / 2**20:7.0f} MiB"
            if result
            else f"skipped: {reason}"
        )
        print(f"B={batch:>6} {method:>7}: {shown}", flush=True)
    if record["naive"]:
        naive, blocked = record["naive"], record["blocked"]
        record["mem_ratio"] = blocked["peak_bytes"] / naive["peak_bytes"]
        record["time_ratio"] = blocked["seconds"] / naive["seconds"]
        record["cpu_time_ratio"] = blocked["cpu_seconds"] / naive["cpu_seconds"]
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--budget-gb", type=float, default=16.0)
    p.add_argument("--out", default="benchmarks/results/loss.json")
    p.add_argument("--measure", nargs=2, metavar=("METHOD", "B"), help=argparse.SUPPRESS)
    return p


def measure_all(args: argparse.Namespace) -> dict:
    """Every batch size's record, and the flat keys the suite reports."""
    records = [compare(batch, args) for batch in args.batches]
    at_16k = next((r for r in records if r["batch"] == 16384), {})
    return {
        "loss_mem_ratio_blocked_vs_naive_16k": at_16k.get("mem_ratio"),
        "loss_time_ratio_blocked_vs_naive_16k": at_16k.get("time_ratio"),
        "loss_cpu_time_ratio_blocked_vs_naive_16k": at_16k.get("cpu_time_ratio"),
        "objective": "3t, three softmax terms, one process",
        "dim": args.dim,
        "block_size": args.block,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "records": records,
        "machine": {
            "cores": args.threads,
            "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "platform": platform.platform(),
        },
    }


def markdown(results: dict) -> str:
    lines = [
        f"Loss: {results['objective']}, D = {results['dim']}, block {results['block_size']}; "
        "forward + backward, peak memory above the inputs.",
        "",
        "| B | naive s | naive MiB | blocked s | blocked MiB | memory ratio | time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        naive, blocked = r["naive"], r["blocked"]
        left = (
            f"{naive['seconds']:.1f} | {naive['peak_bytes'] / 2**20:.0f}"
            if naive
            else "skipped | —"
        )
        ratios = f"{r['mem_ratio']:.3f} | {r['time_ratio']:.2f}" if naive else "— | —"
        lines.append(
            f"| {r['batch']} | {left} | {blocked['seconds']:.1f} "
            f"| {blocked['peak_bytes'] / 2**20:.0f} | {ratios} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        method, batch = args.measure
        print(json.dumps(measure(method, int(batch), args)))
        return
    results = measure_all(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("loss_")}))


if __name__ == "__main__":
    main()
