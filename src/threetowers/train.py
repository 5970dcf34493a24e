"""The training loop: one process or DDP, exact resume from the latest checkpoint.

Re-running the same command with the same run directory continues where the last
checkpoint left off; the data position, optimizer, schedule and RNG state are restored, so the
final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from threetowers.build import build_model
from threetowers.checkpoint import (
    load_latest,
    remove_stale_temporaries,
    restore_model,
    save_checkpoint,
)
from threetowers.config import Config
from threetowers.data.pipeline import TrainingData
from threetowers.eval_suite import chance_levels, evaluate_model, resolve_benchmarks
from threetowers.model import ThreeTowers
from threetowers.optim import make_optimizer
from threetowers.run_dir import MetricsLog, drop_metrics_after, prepare_run_dir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def train(cfg: Config, run_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train (or resume) the run of ``cfg`` in ``run_dir``; returns the run directory."""
    run_dir = prepare_run_dir(cfg, run_dir)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = TrainingData(cfg, run_dir)
    model = build_model(cfg, device=device)
    data.attach(model, progress)
    benchmarks = resolve_benchmarks(cfg.eval, data.world)
    (run_dir / "chance.json").write_text(json.dumps(chance_levels(benchmarks), indent=1))
    optimizer, schedule = make_optimizer(
        model, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.steps
    )
    checkpoints = run_dir / "checkpoints"
    remove_stale_temporaries(checkpoints)
    step, epoch, batch_in_epoch = _resume(checkpoints, model, optimizer, schedule)
    drop_metrics_after(run_dir / "metrics.jsonl", step)

    metrics = MetricsLog(run_dir)
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not progress, unit="step")
    model.train()
    seen, started = 0, time.perf_counter()
    while step < cfg.train.steps:
        for batch in data.batches(epoch, batch_in_epoch):
            loss, logs = _step(model, batch, optimizer, schedule, cfg, device)
            step, batch_in_epoch, seen = step + 1, batch_in_epoch + 1, seen + len(batch["tokens"])
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                rate = seen / (time.perf_counter() - started)
                record = {
                    "step": step,
                    "epoch": epoch,
                    "lr": schedule.get_last_lr()[0],
                    "pairs_per_s": rate,
                } | {k: v.item() for k, v in logs.items()}
                metrics.log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", pairs_s=f"{rate:.0f}"
                )
            bar.update(1)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                }
                save_checkpoint(
                    checkpoints,
                    step,
                    model,
                    state,
                    data.fingerprints(),
                    keep=cfg.train.keep_checkpoints,
                )
            if step < cfg.train.steps and cfg.eval.every and step % cfg.eval.every == 0:
                _evaluate(model, data, benchmarks, cfg, run_dir, step, metrics)
            if step >= cfg.train.steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if evaluated_step(run_dir) != step:  # also after a crash between checkpoint and eval
        _evaluate(model, data, benchmarks, cfg, run_dir, step, metrics)
    metrics.close()
    return run_dir


def _evaluate(model, data, benchmarks, cfg: Config, run_dir: Path, step: int, metrics) -> None:
    scores = evaluate_model(model, data.tokenizer, benchmarks, cfg.eval, run_dir, step=step)
    metrics.log(
        {"step": step, "eval": {k: v for k, v in scores.items() if not isinstance(v, list)}}
    )


def evaluated_step(run_dir: Path) -> int | None:
    path = run_dir / "eval.json"
    return json.loads(path.read_text()).get("step") if path.exists() else None


def _step(model: ThreeTowers, batch: dict, optimizer, schedule, cfg: Config, device):
    batch = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    with autocast(device, cfg.train.precision):
        out = model(
            batch.get("images"),
            batch["tokens"],
            third_features=batch.get("third_features"),
            third_images=batch.get("third_images"),
        )
        loss, logs = model.loss(out)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(
            model.trainable_parameters(), cfg.train.grad_clip
        ).detach()
    optimizer.step()
    schedule.step()
    return loss, logs


def _resume(checkpoints: Path, model, optimizer, schedule) -> tuple[int, int, int]:
    checkpoint = load_latest(checkpoints)
    if checkpoint is None:
        return 0, 0, 0
    restore_model(model, checkpoint)
    optimizer.load_state_dict(checkpoint.state["optimizer"])
    schedule.load_state_dict(checkpoint.state["schedule"])
    torch.set_rng_state(checkpoint.state["rng"])
    return checkpoint.step, checkpoint.state["epoch"], checkpoint.state["batch_in_epoch"]
