"""The benchmark suite: one command, JSON and Markdown out.

    .venv/bin/python benchmarks/run.py [--quick] [--device auto|cpu|cuda]

Writes ``benchmarks/results/latest.json`` (flat headline keys plus every measurement) and
``latest.md``. Every time is a median of repeats after warm-up, and every target is a ratio
measured within this one run, so results from different machines compare only as ratios.
Nothing here asserts a time: the targets are reported as met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import budgets  # noqa: E402
import data_pipeline  # noqa: E402
import loss_memory  # noqa: E402
import matmul  # noqa: E402
import step  # noqa: E402

import threetowers as tt  # noqa: E402
from threetowers.distributed import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "medium": Path(__file__).parent / "configs/medium.yaml",
    "small": Path(__file__).parent / "configs/small.yaml",
}
# (key, comparison, bound): the targets, checked against this run's numbers
TARGETS = [
    ("step_time_ratio_3t_cached_vs_clip", "<=", 1.10),
    ("step_time_ratio_3t_live_vs_clip", "<=", 1.5),
    ("loss_mem_ratio_blocked_vs_naive_16k", "<=", 0.25),
    ("loss_time_ratio_blocked_vs_naive_16k", "<=", 1.3),
    ("data_vs_train_throughput_ratio", ">=", 2.0),
    ("mfu_small", ">=", 0.40),
    # threetowers' clip step against OpenCLIP's (open_clip_step.py): throughput ratios, MFU
    ("open_clip_throughput_ratio_full", ">=", 1.3),
    ("open_clip_throughput_ratio_realistic", ">=", 1.5),
    ("open_clip_step_mfu_full", ">=", 0.80),
    # issue 19's time budgets at the 160 GFLOP/s reference peak (budgets.py; full runs only)
    ("demo_seconds_normalised", "<=", 300),
    ("reproduce_seconds_normalised", "<=", 1800),
]
# OpenCLIP's own environment (make .venv-interop/.built): the side-by-side runs there
INTEROP_PYTHON = ROOT / ".venv-interop" / "bin" / "python"


def machine(device: torch.device) -> dict:
    out = {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device.type,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def run(quick: bool, device: torch.device) -> dict:
    repeats = 3 if quick else 7
    results: dict = {"machine": machine(device), "quick": quick}
    peak = matmul.peak_matmul_gflops(device)
    results["peak_matmul_gflops"] = peak
    print(f"peak fp32 matmul: {peak:.0f} GFLOP/s", flush=True)
    for name, path in CONFIGS.items():
        cfg = tt.load_config(path)
        steps = step.measure(cfg, device, repeats)
        results[f"step_{name}"] = steps
        for variant in step.VARIANTS:
            v = steps[variant]
            v["mfu"] = v["achieved_gflops"] / peak
            print(
                f"{name:>5} {variant:>9}: {v['step_seconds'] * 1e3:7.1f} ms/step "
                f"{v['pairs_per_s']:7.0f} pairs/s  MFU {v['mfu']:.0%}",
                flush=True,
            )
    medium = results["step_medium"]
    for variant in ("lit", "3t_cached", "3t_live"):
        results[f"step_time_ratio_{variant}_vs_clip"] = medium[f"step_time_ratio_{variant}_vs_clip"]
    # What bounds the live-h ratio: h's share of the step and the rate h computes at.
    live, cached = medium["3t_live"], medium["3t_cached"]
    h_seconds = live["step_seconds"] - cached["step_seconds"]
    results["live_h_cost_in_clip_steps"] = h_seconds / medium["clip"]["step_seconds"]
    results["live_h_flops_vs_clip"] = (live["flops_per_step"] - cached["flops_per_step"]) / medium[
        "clip"
    ]["flops_per_step"]
    results["live_h_mfu"] = (live["flops_per_step"] - cached["flops_per_step"]) / (
        h_seconds * 1e9 * peak
    )
    # MFU of the trainable towers at the small config: 3T with cached h, the recommended setup
    results["mfu_small"] = results["step_small"]["3t_cached"]["mfu"]

    medium_cfg = tt.load_config(CONFIGS["medium"])
    data = {
        workers: data_pipeline.pairs_per_second(medium_cfg, workers, batches=6 if quick else 20)
        for workers in (0, 1, 2)
    }
    results["data_pairs_per_s"] = data
    # what 3t with h's cached features consumes at this config, at its own worker count
    trained = "3t_cached" if medium_cfg.model.mode == "3t" else medium_cfg.model.mode
    results["data_vs_train_throughput_ratio"] = (
        data[medium_cfg.data.num_workers] / medium[trained]["pairs_per_s"]
    )
    print(f"data pipeline pairs/s by workers: {data}", flush=True)

    # The loss runs each measurement in a fresh process, on CUDA whenever there is one.
    loss_args = ["--batches", "4096", "16384", "--repeats", "1", "--warmup", "0"] if quick else []
    results["loss"] = loss_memory.measure_all(loss_memory.parser().parse_args(loss_args))
    results |= {k: v for k, v in results["loss"].items() if k.startswith("loss_")}
    if device.type == "cpu":
        results |= open_clip_side_by_side(quick)
        if not quick:  # ~15 minutes: the demo whole, and the reproduce grid's jobs
            results["budgets"] = budgets.measure()
            results |= {k: v for k, v in results["budgets"].items() if k.endswith("normalised")}
    return results


def open_clip_side_by_side(quick: bool) -> dict:
    """open_clip_step.py in OpenCLIP's environment, where there is one (else noted)."""
    if not INTEROP_PYTHON.is_file():
        print("no OpenCLIP environment: make .venv-interop/.built for the side by side")
        return {"open_clip_step": "skipped: no .venv-interop (make .venv-interop/.built)"}
    out = ROOT / "benchmarks" / "results" / "open_clip_step.json"
    command = [str(INTEROP_PYTHON), str(Path(__file__).with_name("open_clip_step.py"))]
    command += ["--out", str(out)] + (["--quick"] if quick else [])
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    side = json.loads(out.read_text())
    return {
        "open_clip_step": side,
        "open_clip_throughput_ratio_full": side["throughput_ratio_full"],
        "open_clip_throughput_ratio_realistic": side["throughput_ratio_realistic"],
        "open_clip_step_mfu_full": side["full_threetowers"]["mfu"],
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"{m['device']}, {m['cores']} cores, torch {m['torch']}; peak fp32 matmul "
        f"{results['peak_matmul_gflops']:.0f} GFLOP/s measured in the same run.",
        "",
        "| target | measured | bound | met |",
        "|---|---|---|---|",
    ]
    for key, op, bound in TARGETS:
        value = results.get(key)
        met = value is not None and (value <= bound if op == "<=" else value >= bound)
        shown = "—" if value is None else f"{value:.3f}"
        lines.append(f"| `{key}` | {shown} | {op} {bound} | {'yes' if met else 'no'} |")
    lines += [
        "",
        "| config | variant | ms/step | pairs/s | GFLOP/step | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        for variant, v in results[f"step_{name}"].items():
            if isinstance(v, dict):
                lines.append(
                    f"| {name} | {variant} | {v['step_seconds'] * 1e3:.1f} "
                    f"| {v['pairs_per_s']:.0f} | {v['flops_per_step'] / 1e9:.2f} | {v['mfu']:.0%} |"
                )
    data = results["data_pairs_per_s"]
    lines += [
        "",
        f"Live h at the medium config: {results['live_h_flops_vs_clip']:.2f}x CLIP's step FLOPs "
        f"at {results['live_h_mfu']:.0%} MFU cost {results['live_h_cost_in_clip_steps']:.2f} "
        "CLIP steps.",
        "",
        "Data pipeline (medium config, decode + resize + tokenise + normalise), pairs/s: "
        + ", ".join(f"{w} workers {r:.0f}" for w, r in data.items()),
        "",
        loss_memory.markdown(results["loss"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    results = run(args.quick, resolve_device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "latest.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
