"""Training-step throughput of clip, lit and 3t (live h and cached h) at one config.

Run: .venv/bin/python benchmarks/training_step.py [CONFIG] [--out benchmarks/results/step.json]

Every mode gets the same towers, batch and inputs; h is EfficientNet-Lite0 at the config's
resolution. Times are medians over repeated steps after warm-up, and the ratios to clip come
from the same run, so they compare like with like on whatever machine runs this.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import threetowers as tt
from threetowers.optim import make_optimizer


def step_seconds(model, batch: dict, repeats: int, warmup: int = 2) -> float:
    optimizer, schedule = make_optimizer(model, 1e-4, 0.1, 1, 1000)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        out = model(
            batch.get("images"),
            batch["tokens"],
            third_features=batch.get("third_features"),
            third_images=batch.get("third_images"),
        )
        loss, _ = model.loss(out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/training_step.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = tt.load_config(args.config)
    batch_size, context = cfg.data.batch_size, cfg.model.text.context_length
    size = cfg.model.image.image_size
    tokens = torch.randint(4, cfg.model.text.vocab_size, (batch_size, context))
    tokens[:, context * 2 // 3 :] = 0  # typical padding
    images = torch.randn(batch_size, 3, size, size)

    results: dict[str, float] = {}
    for name, mode, cached in (
        ("clip", "clip", False),
        ("lit", "lit", True),
        ("3t_cached", "3t", True),
        ("3t_live", "3t", False),
    ):
        model = tt.build_model(
            cfg.model_copy(update={"model": cfg.model.model_copy(update={"mode": mode})})
        )
        batch = {"tokens": tokens}
        if mode != "lit":
            batch["images"] = images
        if mode != "clip":
            h = model.third_tower
            third = torch.randn(
                batch_size, 3, h.preprocessing.image_size, h.preprocessing.image_size
            )
            if cached:
                batch["third_features"] = h(third)
            else:
                batch["third_images"] = third
        seconds = step_seconds(model, batch, args.repeats)
        results[f"step_seconds_{name}"] = seconds
        results[f"pairs_per_s_{name}"] = batch_size / seconds
        print(f"{name:>10}: {seconds * 1000:7.1f} ms/step, {batch_size / seconds:7.1f} pairs/s")
    clip = results["step_seconds_clip"]
    results |= {
        "step_time_ratio_lit_vs_clip": results["step_seconds_lit"] / clip,
        "step_time_ratio_3t_cached_vs_clip": results["step_seconds_3t_cached"] / clip,
        "step_time_ratio_3t_live_vs_clip": results["step_seconds_3t_live"] / clip,
        "config": args.config,
        "machine": {
            "cores": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": "cpu",
            "platform": platform.platform(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: round(v, 3) for k, v in results.items() if "ratio" in k}))


if __name__ == "__main__":
    main()
