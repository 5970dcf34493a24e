"""The training loop: one process or DDP, exact resume from the latest checkpoint.

Re-running the same command with the same run directory continues where the last
checkpoint left off; the data position, optimizer, schedule, RNG state and the counts of bad
samples and skipped steps are restored, so the final weights and counts equal those of an
uninterrupted run.

Faults a long run meets on the way: bad samples are skipped and counted (``BadSampleLog``;
a batch left with none is no step); a step with a non-finite loss or gradient changes no
weight and no optimizer state, and ``train.max_bad_steps`` of them in a row stop the run.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from threetowers.atomic import write_atomic
from threetowers.build import build_model
from threetowers.checkpoint import (
    load_latest,
    remove_stale_temporaries,
    restore_model,
    save_checkpoint,
)
from threetowers.config import Config
from threetowers.data.bad_samples import BadDataError, BadSampleLog
from threetowers.data.pipeline import TrainingData
from threetowers.eval_inputs import EvalCache
from threetowers.eval_suite import chance_levels, evaluate_model, resolve_benchmarks
from threetowers.model import ThreeTowers
from threetowers.optim import make_optimizer
from threetowers.run_dir import MetricsLog, drop_metrics_after, prepare_run_dir

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class StepHealth:
    """Skipped (non-finite) steps: in total, and in a row; ``limit`` in a row stop the run."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def update(self, finite: bool, step: int, logs: dict, last_checkpoint: Path | None) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        values = {k: float(logs[k]) for k in ("loss", "grad_norm") if k in logs}
        log.warning(
            "step %d: non-finite %s; update skipped (%d in a row)", step, values, self.in_a_row
        )
        if self.in_a_row >= self.limit:
            kept = (
                f"the last checkpoint, {last_checkpoint}, is intact"
                if last_checkpoint
                else "no checkpoint was written yet"
            )
            raise NonFiniteError(
                f"training stopped at step {step}: {self.in_a_row} steps in a row had a "
                f"non-finite loss or gradient ({values}); their updates were skipped and "
                f"{kept}. Lower train.lr or set train.grad_clip, check the data, or raise "
                f"train.max_bad_steps (now {self.limit})"
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.skipped = int(state["in_a_row"]), int(state["skipped"])


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
    benchmarks = resolve_benchmarks(cfg.eval, data.world, cfg.data.allow_absolute_paths)
    write_atomic(run_dir / "chance.json", json.dumps(chance_levels(benchmarks), indent=1))
    optimizer, schedule = make_optimizer(
        model, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.steps
    )
    checkpoints = run_dir / "checkpoints"
    remove_stale_temporaries(checkpoints)
    bad_data = BadSampleLog(cfg.data.max_bad_fraction, "training data", size=len(data.pairs))
    health = StepHealth(cfg.train.max_bad_steps)
    step, epoch, batch_in_epoch, last_checkpoint = _resume(
        checkpoints, model, optimizer, schedule, bad_data, health
    )
    drop_metrics_after(run_dir / "metrics.jsonl", step)

    metrics = MetricsLog(run_dir)
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not progress, unit="step")
    model.train()
    seen, started = 0, time.perf_counter()
    while step < cfg.train.steps:
        steps_before, whole_epoch = step, batch_in_epoch == 0
        for batch in data.batches(epoch, batch_in_epoch):
            bad_data.record(len(batch["keys"]), batch.pop("skipped"))
            batch_in_epoch += 1
            if not batch["keys"]:
                continue  # every sample of this batch was bad: no step
            logs, finite = _step(model, batch, optimizer, schedule, cfg, device)
            step, seen = step + 1, seen + len(batch["keys"])
            health.update(finite, step, logs, last_checkpoint)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                rate = seen / (time.perf_counter() - started)
                record = (
                    {
                        "step": step,
                        "epoch": epoch,
                        "lr": schedule.get_last_lr()[0],
                        "pairs_per_s": rate,
                    }
                    | {k: v.item() for k, v in logs.items()}
                    | {"skipped_steps": health.skipped}
                    | bad_data.metrics()
                )
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
                    "bad_samples": bad_data.state_dict(),
                    "health": health.state_dict(),
                }
                last_checkpoint = save_checkpoint(
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
            if whole_epoch and step == steps_before:  # else: empty epochs for ever
                raise BadDataError(
                    f"epoch {epoch} of the training data gave no batch to train on "
                    f"({len(data.pairs)} samples, data.batch_size={cfg.data.batch_size}; "
                    f"{bad_data.summary()}); lower data.batch_size or add data"
                )
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    bad_data.check()  # a run shorter than the bad-fraction grace is judged at its end
    log.info(bad_data.summary())
    if health.skipped:
        log.warning("%d steps with a non-finite loss or gradient were skipped", health.skipped)
    if evaluated_step(run_dir) != step:  # also after a crash between checkpoint and eval
        _evaluate(model, data, benchmarks, cfg, run_dir, step, metrics)
    metrics.close()
    return run_dir


def _evaluate(model, data, benchmarks, cfg: Config, run_dir: Path, step: int, metrics) -> None:
    scores = evaluate_model(
        model,
        data.tokenizer,
        benchmarks,
        cfg.eval,
        run_dir,
        step=step,
        max_bad_fraction=cfg.data.max_bad_fraction,
        cache=EvalCache.of(cfg.data),
    )
    metrics.log(
        {"step": step, "eval": {k: v for k, v in scores.items() if not isinstance(v, list)}}
    )


def evaluated_step(run_dir: Path) -> int | None:
    path = run_dir / "eval.json"
    return json.loads(path.read_text()).get("step") if path.exists() else None


def _step(model: ThreeTowers, batch: dict, optimizer, schedule, cfg: Config, device):
    """One optimizer step; returns its logs and whether it was finite (else nothing moved)."""
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
    parameters = model.trainable_parameters()
    if cfg.train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.train.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    logs["grad_norm"] = norm.detach()
    # One host sync per step (as AMP's GradScaler makes): a non-finite loss or gradient must
    # reach neither the weights nor Adam's moments, so the step is decided here.
    finite = bool(torch.isfinite(loss.detach() + norm.detach()))
    if finite:
        optimizer.step()
        model.objective.clamp_temperatures_()
    # The schedule moves on either way: steps, not updates, index the learning rate.
    schedule.step()
    return logs, finite


def _resume(
    checkpoints: Path, model, optimizer, schedule, bad_data: BadSampleLog, health: StepHealth
) -> tuple[int, int, int, Path | None]:
    """Restore the latest valid checkpoint: (step, epoch, batch in epoch, its path)."""
    checkpoint = load_latest(checkpoints)
    if checkpoint is None:
        return 0, 0, 0, None
    restore_model(model, checkpoint)
    state = checkpoint.state
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    if "bad_samples" in state:  # older checkpoints have no counts: they start from zero
        bad_data.load_state_dict(state["bad_samples"])
        health.load_state_dict(state["health"])
    path = checkpoints / f"step_{checkpoint.step:08d}"
    return checkpoint.step, state["epoch"], state["batch_in_epoch"], path
