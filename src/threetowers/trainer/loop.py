"""The training loop: one process, DDP or FSDP, exact resume from the latest checkpoint.

Re-running the same command with the same run directory continues where the last
checkpoint left off; the data position, optimizer, schedule, RNG state and the counts of bad
samples and skipped steps are restored, so the final weights and counts equal those of an
uninterrupted run.

Faults a long run meets on the way: bad samples are skipped and counted (``BadSampleLog``;
a batch left with none is no step); a step with a non-finite loss or gradient changes no
weight and no optimizer state, and ``train.max_bad_steps`` of them in a row stop the run.
One process writes a run directory (its lock); SIGTERM, how clusters stop a job, saves a
checkpoint at the next step boundary and stops the run cleanly (:class:`Stopped`).

The loop is one ``for`` over the steps left and the data's endless stream of global
batches (``data/stream.py``, which owns the epochs and the data position); the step is built
once (``trainer/step.py``); logging, checkpoints and evaluation run when :func:`due`. A
start checks what a user can get wrong before any long work (``trainer/start.py``).

Fine-tuning: ``train.init_from`` starts a new run from another run's trained weights, those
whose names and shapes fit (the rest stay new; one log line names both sides). Optimizer,
schedule, data position and step start afresh; the source run's tokenizer.json is copied,
since the text tower's token ids must mean the same words, unless ``data.tokenizer`` names
one. It applies only while the run has no checkpoint of its own: re-running the command
resumes the new run.

Continuing: the same config with a larger ``train.steps`` continues a run in its directory.
The added steps are scheduled as a run of their own: ``train.warmup_steps`` of linear warmup
to ``train.lr``, then cosine to 0 at the new ``train.steps``; Adam's moments, the data
position and the counts carry on (a run stopped short of its ``train.steps`` first ends its
own schedule). A restart rather than one cosine stretched over all the steps: the finished
run ended at lr 0 under its own schedule, and stretching would start the added steps with a
jump to a mid-cosine lr, without warmup. The steps continued from are recorded in
config.yaml (``train.continued_from``), so the lr is a function of the config and the step
alone: a resume anywhere in a continued run is exact, and a run never continued keeps its
schedule and numbers.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from threetowers import distributed
from threetowers.config import Config
from threetowers.data.device import normalised, to_device
from threetowers.data.sources.bad_samples import BadSampleLog
from threetowers.data.sources.mix import SourceCounts
from threetowers.data.stream import BatchStream
from threetowers.distributed import resolve_device
from threetowers.evaluation.inputs import EvalCache
from threetowers.evaluation.suite import evaluate_model
from threetowers.evaluation.validation import validate
from threetowers.files import locks
from threetowers.files.checkpoints import checkpoint_path
from threetowers.files.readback import DamagedFileError, read_json
from threetowers.trainer.checkpoint import save_checkpoint
from threetowers.trainer.optim import continued_schedule, follow, make_optimizer
from threetowers.trainer.run_dir import MetricsLog, drop_metrics_after, run_dir_of
from threetowers.trainer.sharded_checkpoint import save_sharded_checkpoint
from threetowers.trainer.sharding import (
    EvaluationCopy,
    full_trainable_state,
    is_sharded,
    shard_model,
)
from threetowers.trainer.start import resume, start
from threetowers.trainer.state import StepHealth, TrainingState, due
from threetowers.trainer.step import TrainStep

log = logging.getLogger(__name__)


def train(cfg: Config, run_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train (or resume) the run of ``cfg`` in ``run_dir``; returns the run directory.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: it joins the process group, and
    ``data.batch_size`` is the global batch, split evenly over the ranks.
    """
    device = distributed.local_device(resolve_device(cfg.train.device))
    created_group = distributed.init_from_env(device)
    run_dir = run_dir_of(cfg, run_dir)
    try:
        with _one_writer(run_dir), _sigterm_stops() as stop:
            return _train(cfg, run_dir, progress, device, stop)
    finally:
        if created_group:
            dist.destroy_process_group()


def _one_writer(run_dir: Path):
    """Rank 0 (the only rank that writes the run directory) holds its lock for the run."""
    if not distributed.is_main():
        return nullcontext()
    fix = "wait for it to finish, or train in another run directory (--run-dir)"
    return locks.exclusive(run_dir, "run directory", fix)


class Stopped(Exception):
    """SIGTERM stopped the run at a step boundary, its checkpoint saved: re-run to resume."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by SIGTERM at step {step}; {checkpoint} saved")
        self.step, self.checkpoint = step, checkpoint


@contextmanager
def _sigterm_stops():
    """SIGTERM (how SLURM and Kubernetes stop a job) sets the event instead of killing the
    process: the loop saves a checkpoint at the next step boundary and stops."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach main only
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(
    cfg: Config, run_dir: Path, progress: bool, device: torch.device, stop: threading.Event
) -> Path:
    main = distributed.is_main()
    distributed.local_batch_size(cfg.data.batch_size)  # fail before any work
    if not main:  # the ranks log the same (global) counts: rank 0 speaks for all
        logging.getLogger("threetowers").setLevel(logging.ERROR)
    torch.manual_seed(cfg.train.seed)
    begun = start(cfg, run_dir, device, progress and main)
    cfg, model, data, benchmarks = begun.cfg, begun.model, begun.data, begun.benchmarks
    sharded = cfg.train.parallel == "fsdp"
    # rank 0's unsharded copy for evaluation, made while the model is whole
    evaluation_copy = (
        EvaluationCopy(model) if sharded and main and distributed.world_size() > 1 else None
    )
    if sharded:
        shard_model(model, cfg.train.precision, device)  # before the optimizer takes the weights
    optimizer, schedule = make_optimizer(
        model, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.steps
    )
    bad_data = BadSampleLog(cfg.data.max_bad_fraction, "training data", size=len(data.pairs))
    sources = SourceCounts(data.mix)
    health = StepHealth(cfg.train.max_bad_steps)
    run = TrainingState(optimizer, schedule, bad_data, health, sources)
    last_checkpoint = resume(begun.resumed, run_dir, model, run, sharded)
    follow(
        schedule,
        continued_schedule(cfg.train.warmup_steps, cfg.train.steps, cfg.train.continued_from),
    )

    def checkpoint(step: int) -> Path:
        return _checkpoint(run_dir / "checkpoints", step, model, run, data, cfg)

    def evaluate(step: int) -> None:
        _evaluate(
            model, evaluation_copy, data, benchmarks, cfg, run_dir, step, metrics if main else None
        )

    # micro-batches: the batch stays uint8 until each micro-batch's pass normalises its views
    deferred = cfg.train.micro_batch > 0
    views = data.views if deferred else None
    train_step = TrainStep(model, optimizer, schedule, device, cfg.train, views)
    stream = BatchStream(data, run.position, bad_data, sources, stop.is_set, device, not deferred)
    if main:
        drop_metrics_after(run_dir / "metrics.jsonl", run.step)
        metrics = MetricsLog(run_dir)
    total = cfg.train.steps
    bar = tqdm(total=total, initial=run.step, disable=not (progress and main), unit="step")
    model.train()
    seen, since = 0, time.perf_counter()
    with closing(iter(stream)) as batches:  # its loader's workers leave with the loop
        # range first: zip stops before reading a batch past the last step
        for step, batch in zip(range(run.step + 1, total + 1), batches, strict=False):
            logs, finite = train_step(batch)
            run.step, seen = step, seen + sum(batch.counts)
            run.health.update(finite, step, logs, last_checkpoint)
            if due(step, cfg.train.log_every, total):
                record = _record(run, logs, seen, since)
                if main:
                    metrics.log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    lr=f"{record['lr']:.1e}",
                    pairs_s=f"{record['pairs_per_s']:.0f}",
                )
            bar.update(1)
            if due(step, cfg.train.checkpoint_every, total) or batch.stop:
                last_checkpoint = checkpoint(step)
            if batch.stop:  # every rank saw the same flag: all stop here, after rank 0 saved
                bar.close()
                if main:
                    metrics.close()
                raise Stopped(step, last_checkpoint)  # every rank has left the checkpoint
            if step < total and due(step, cfg.eval.every):
                evaluate(step)
    bar.close()
    bad_data.check()  # a run shorter than the bad-fraction grace is judged at its end
    log.info(bad_data.summary())
    if run.health.skipped:
        log.warning("%d steps with a non-finite loss or gradient were skipped", run.health.skipped)
    # also after a crash between checkpoint and eval; rank 0 decides for all
    if distributed.all_gather_objects(main and evaluated_step(run_dir) != run.step)[0]:
        evaluate(run.step)  # the ranks leave it together: the run is complete when any returns
    if main:
        metrics.close()
    return run_dir


def _record(run: TrainingState, logs: dict, seen: int, since: float) -> dict:
    """A line of metrics.jsonl: the step's logs (the mean of the ranks' shares: the global
    loss) and the run's counts."""
    logs = distributed.mean_over_ranks(logs)
    rate = seen / (time.perf_counter() - since)
    return (
        {
            "step": run.step,
            "epoch": run.position.epoch,
            "lr": run.schedule.get_last_lr()[0],
            "pairs_per_s": rate,
        }
        | {k: v.item() for k, v in logs.items()}
        | {"skipped_steps": run.health.skipped}
        | run.bad_data.metrics()
        | run.sources.metrics()
    )


def _checkpoint(directory: Path, step: int, model, run: TrainingState, data, cfg: Config) -> Path:
    """Every rank calls it and leaves it once the checkpoint is published: rank 0 writes it
    (every rank its shard under fsdp), the others wait outside the training collectives."""
    meta, keep = data.fingerprints(), cfg.train.keep_checkpoints
    if cfg.train.parallel == "fsdp":
        return save_sharded_checkpoint(
            directory, step, model, run.optimizer, run.state_dict(), meta, keep
        )
    # every rank holds the same weights, optimizer state, position and counts under DDP
    path = checkpoint_path(directory, step)
    if distributed.is_main():
        path = save_checkpoint(directory, step, model, run.state_dict(), meta, keep)
    distributed.meet()
    return path


def _evaluate(
    model, copy: EvaluationCopy | None, data, benchmarks, cfg, run_dir: Path, step: int, metrics
) -> None:
    """Rank 0 evaluates alone (a sharded model's weights gathered into its ``copy`` first)
    while the others wait outside the training collectives; all leave together."""
    weights = full_trainable_state(model) if is_sharded(model) else None  # a collective
    if distributed.is_main():
        target = copy.filled(weights) if weights is not None else model
        with distributed.alone():
            _evaluate_on_rank_0(target, data, benchmarks, cfg, run_dir, step, metrics)
        if weights is not None:
            copy.parked()
    distributed.meet()


def _evaluate_on_rank_0(model, data, benchmarks, cfg: Config, run_dir: Path, step: int, metrics):
    validation = {}
    if data.val_pairs is not None:
        device = next(model.parameters()).device
        batches = data.validation_batches()

        def on_device(batch: dict) -> dict:
            return normalised(to_device(batch, device), data.val_views)

        validation = validate(model, data.tokenizer, batches, data.val_captions, on_device)
    scores = evaluate_model(
        model,
        data.tokenizer,
        benchmarks,
        cfg.eval,
        run_dir,
        step=step,
        max_bad_fraction=cfg.data.max_bad_fraction,
        cache=EvalCache.of(cfg.data),
        extra=validation,
    )
    metrics.log(
        {"step": step, "eval": {k: v for k, v in scores.items() if not isinstance(v, list)}}
    )


def evaluated_step(run_dir: Path) -> int | None:
    path = run_dir / "eval.json"
    if not path.exists():
        return None
    try:
        return read_json(path, "it is evaluated again").get("step")
    except DamagedFileError as error:  # the evaluation can always be made again
        log.warning("%s", error)
        return None
