"""The training loop: one process or DDP, exact resume from the latest checkpoint.

Re-running the same command with the same run directory continues where the last
checkpoint left off; the data position, optimizer, schedule, RNG state and the counts of bad
samples and skipped steps are restored, so the final weights and counts equal those of an
uninterrupted run.

Faults a long run meets on the way: bad samples are skipped and counted (``BadSampleLog``;
a batch left with none is no step); a step with a non-finite loss or gradient changes no
weight and no optimizer state, and ``train.max_bad_steps`` of them in a row stop the run.
One process writes a run directory (its lock); SIGTERM, how clusters stop a job, saves a
checkpoint at the next step boundary and stops the run cleanly (:class:`Stopped`).

A start checks what a user can get wrong before any long work (training the tokenizer,
building the frozen towers' caches): the run directory's checkpoints and config, every
benchmark path, ``train.init_from`` and the data. config.yaml is written only then, so the
corrected command of a start that failed runs in the same directory (``trainer/run_dir.py``).

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

import functools
import itertools
import json
import logging
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from threetowers import distributed
from threetowers.config import Config, ConfigError, load_config
from threetowers.data.pipeline import TrainingData, to_device, training_source
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog
from threetowers.data.sources.mix import SourceCounts
from threetowers.evaluation.inputs import EvalCache
from threetowers.evaluation.suite import chance_levels, evaluate_model, resolve_benchmarks
from threetowers.evaluation.validation import validate
from threetowers.files import locks
from threetowers.files.atomic import write_atomic
from threetowers.files.readback import DamagedFileError, read_json
from threetowers.model.build import build_model
from threetowers.model.three_towers import ThreeTowers, batch_embeddings
from threetowers.trainer.checkpoint import (
    Checkpoint,
    check_tokenizer,
    checkpoint_path,
    load_latest,
    load_matching,
    remove_stale_temporaries,
    restore_model,
    save_checkpoint,
)
from threetowers.trainer.optim import continued_schedule, follow, make_optimizer
from threetowers.trainer.run_dir import (
    MetricsLog,
    config_to_train,
    drop_metrics_after,
    prepare_run_dir,
    record_config,
    run_dir_of,
)
from threetowers.trainer.state import StepHealth, TrainingState, due
from threetowers.trainer.trained import find_checkpoint, trained_tokenizer

log = logging.getLogger(__name__)


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
    world, main = distributed.world_size(), distributed.is_main()
    distributed.local_batch_size(cfg.data.batch_size)  # fail before any work
    if not main:  # the ranks log the same (global) counts: rank 0 speaks for all
        logging.getLogger("threetowers").setLevel(logging.ERROR)
    torch.manual_seed(cfg.train.seed)
    checkpoints = run_dir / "checkpoints"
    with distributed.main_first():  # rank 0 writes the run directory, tokenizer and caches
        # every path a user gives is checked before any long work (tokenizer, caches)
        cfg, resumed = _admit(cfg, run_dir, main)
        init = _init_from(cfg, run_dir, main) if resumed is None and cfg.train.init_from else None
        benchmarks = _benchmarks(cfg) if main else None
        data = TrainingData(cfg, run_dir)  # opens the data, then trains or loads the tokenizer
        if main:  # the data and every path opened: this start is the run's
            record_config(cfg, run_dir)
            _say_if_blind(cfg, benchmarks)
        tokenizer = cfg.data.tokenizer or run_dir / "tokenizer.json"
        check_tokenizer(resumed, data.tokenizer.digest(), str(tokenizer))
        model = build_model(cfg, device=device)
        if init is not None:
            _initialise(model, init, cfg.train.init_from)
        data.attach(model, progress and main)
    if main:
        write_atomic(run_dir / "chance.json", json.dumps(chance_levels(benchmarks), indent=1))
    optimizer, schedule = make_optimizer(
        model, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.steps
    )
    bad_data = BadSampleLog(cfg.data.max_bad_fraction, "training data", size=len(data.pairs))
    sources = SourceCounts(data.mix)
    health = StepHealth(cfg.train.max_bad_steps)
    run = TrainingState(optimizer, schedule, bad_data, health, sources)
    last_checkpoint = _resume(resumed, checkpoints, model, run)
    follow(
        schedule,
        continued_schedule(cfg.train.warmup_steps, cfg.train.steps, cfg.train.continued_from),
    )
    forward = _distributed_data_parallel(model, device) if world > 1 else model
    if main:
        drop_metrics_after(run_dir / "metrics.jsonl", run.step)
        metrics = MetricsLog(run_dir)
    total = cfg.train.steps
    bar = tqdm(total=total, initial=run.step, disable=not (progress and main), unit="step")
    model.train()
    seen, started = 0, time.perf_counter()
    while run.step < total:
        steps_before, whole_epoch = run.step, run.batch_in_epoch == 0
        for batch in data.batches(run.epoch, run.batch_in_epoch):
            counts, skipped, stopping, drawn = _across_ranks(
                batch["ids"], batch.pop("skipped"), stop.is_set(), sources
            )
            bad_data.record(sum(counts), skipped)
            sources.record(drawn, skipped)
            run.batch_in_epoch += 1
            if min(counts) == 0:  # some rank has nothing left: no step (the ranks move together)
                if sum(counts):
                    log.warning(
                        "batch %d of epoch %d: a rank's share held only bad samples, so the "
                        "other ranks' %d samples were not trained on",
                        run.batch_in_epoch - 1,
                        run.epoch,
                        sum(counts),
                    )
                continue
            logs, finite = _step(forward, model, batch, counts, optimizer, schedule, cfg, device)
            run.step, seen = run.step + 1, seen + sum(counts)
            run.health.update(finite, run.step, logs, last_checkpoint)
            if due(run.step, cfg.train.log_every, total):
                logs = distributed.mean_over_ranks(logs)  # the shares' mean: the global loss
                rate = seen / (time.perf_counter() - started)
                record = (
                    {
                        "step": run.step,
                        "epoch": run.epoch,
                        "lr": schedule.get_last_lr()[0],
                        "pairs_per_s": rate,
                    }
                    | {k: v.item() for k, v in logs.items()}
                    | {"skipped_steps": run.health.skipped}
                    | bad_data.metrics()
                    | sources.metrics()
                )
                if main:
                    metrics.log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", pairs_s=f"{rate:.0f}"
                )
            bar.update(1)
            if due(run.step, cfg.train.checkpoint_every, total) or stopping:
                # Every rank holds the same weights, optimizer state, position and counts, so
                # rank 0's checkpoint restores them all.
                last_checkpoint = checkpoint_path(checkpoints, run.step)
                if main:
                    last_checkpoint = save_checkpoint(
                        checkpoints,
                        run.step,
                        model,
                        run.state_dict(),
                        data.fingerprints(),
                        keep=cfg.train.keep_checkpoints,
                    )
            if stopping:  # every rank saw the same flag: all stop here, after rank 0 saved
                bar.close()
                if main:
                    metrics.close()
                distributed.barrier()
                raise Stopped(run.step, last_checkpoint)
            if main and run.step < total and due(run.step, cfg.eval.every):
                _evaluate(model, data, benchmarks, cfg, run_dir, run.step, metrics)
            if run.step >= total:
                break
        else:
            if whole_epoch and run.step == steps_before:  # else: empty epochs for ever
                raise BadDataError(
                    f"epoch {run.epoch} of the training data gave no batch to train on "
                    f"({len(data.pairs)} samples, data.batch_size={cfg.data.batch_size}; "
                    f"{bad_data.summary()}); lower data.batch_size or add data"
                )
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    bar.close()
    bad_data.check()  # a run shorter than the bad-fraction grace is judged at its end
    log.info(bad_data.summary())
    if run.health.skipped:
        log.warning("%d steps with a non-finite loss or gradient were skipped", run.health.skipped)
    if main:
        if evaluated_step(run_dir) != run.step:  # also after a crash between checkpoint and eval
            _evaluate(model, data, benchmarks, cfg, run_dir, run.step, metrics)
        metrics.close()
    distributed.barrier()  # the run is complete (checkpoint, eval.json) when any rank returns
    return run_dir


def _admit(cfg: Config, run_dir: Path, main: bool) -> tuple[Config, Checkpoint | None]:
    """The config this start of the run trains (a continuation's records its history) and
    the checkpoint it resumes (None: none)."""
    checkpoints = run_dir / "checkpoints"
    if main:
        remove_stale_temporaries(checkpoints)
    resumed = load_latest(checkpoints)  # no usable checkpoint stops here
    step = None if resumed is None else resumed.step
    if main:
        return prepare_run_dir(cfg, run_dir, step), resumed
    return config_to_train(cfg, run_dir, step), resumed  # as rank 0 admitted and recorded it


def _benchmarks(cfg: Config):
    """The benchmarks, their paths checked (the embedded world's manifest names its own)."""
    _, world = training_source(cfg)
    return resolve_benchmarks(cfg.eval, world, cfg.data.allow_absolute_paths)


def _say_if_blind(cfg: Config, benchmarks) -> None:
    """A run with nothing to evaluate on says so, once, when its start has succeeded."""
    if not (benchmarks.retrieval or benchmarks.zeroshot or cfg.eval.val_data):
        log.warning(
            "no evaluation set: eval.retrieval, eval.zeroshot and eval.val_data are unset, so "
            "this run reports its training loss only; set eval.val_data to held-out pairs of "
            "your data to see its validation loss and retrieval"
        )


def _init_from(cfg: Config, run_dir: Path, main: bool) -> Checkpoint:
    """The checkpoint ``train.init_from`` names, checked with its tokenizer before any work;
    unless ``data.tokenizer`` is set, rank 0 copies that tokenizer.json into the run, byte
    for byte (a new tokenizer would give the trained token embeddings other words)."""
    try:
        source, checkpoint = find_checkpoint(cfg.train.init_from)
        tokenizer = source / "tokenizer.json"
        if cfg.data.tokenizer is None:
            if not tokenizer.is_file():
                raise FileNotFoundError(
                    f"{tokenizer} is missing, and the text tower's token ids mean its "
                    "words; restore it, or set data.tokenizer to the tokenizer "
                    f"{source} was trained with"
                )
            trained_tokenizer(source, load_config(source / "config.yaml"), checkpoint)
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.init_from: {error}") from None
    if main and cfg.data.tokenizer is None:
        write_atomic(run_dir / "tokenizer.json", tokenizer.read_bytes())
    return checkpoint


def _initialise(model: ThreeTowers, checkpoint: Checkpoint, source: str) -> None:
    """Start ``model`` from the weights of ``checkpoint`` that fit it."""
    new, unused = load_matching(model, checkpoint.model)
    log.info(
        "train.init_from: %d tensors from step %d of %s; left new: %s; not used: %s",
        len(checkpoint.model) - len(unused),
        checkpoint.step,
        source,
        ", ".join(new) or "none",
        ", ".join(unused) or "none",
    )


def _distributed_data_parallel(model: ThreeTowers, device: torch.device):
    """DDP over the trainable parts. The frozen towers stay outside: DDP neither broadcasts
    nor synchronises their weights and buffers, and ``_step`` runs them before the wrapped
    forward."""
    towers = model.frozen
    frozen = [
        f"frozen.{name}"
        for name, _ in itertools.chain(towers.named_parameters(), towers.named_buffers())
    ]
    if frozen:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def _across_ranks(ids: list[str], skipped: list, stop: bool, sources: SourceCounts):
    """Every rank's batch size, all ranks' bad samples, whether any rank was asked to stop,
    and every rank's samples by source: the counts every rank keeps (and rank 0 checkpoints)
    are those of the global batch, and the ranks stop at the same step."""
    shares = distributed.all_gather_objects((len(ids), skipped, stop, sources.of(ids)))
    counts = [count for count, *_ in shares]
    bad = [sample for _, share, *_ in shares for sample in share]
    return counts, bad, any(stopped for *_, stopped, _ in shares), [s for *_, s in shares]


def _evaluate(model, data, benchmarks, cfg: Config, run_dir: Path, step: int, metrics) -> None:
    validation = {}
    if data.val_pairs is not None:
        device = next(model.parameters()).device
        batches = data.validation_batches()
        on_device = functools.partial(to_device, device=device)
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


def _step(
    forward, model: ThreeTowers, batch: dict, counts: list[int], optimizer, schedule, cfg, device
):
    """One optimizer step; returns its logs and whether it was finite (else nothing moved).

    ``forward`` is the model or its DDP wrapper; ``counts`` every rank's batch size.
    """
    batch = to_device(batch, device)
    with autocast(device, cfg.train.precision):
        out = batch_embeddings(model, batch, forward)  # frozen towers outside the DDP wrapper
        loss, logs = model.loss(out, counts)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = model.trainable_parameters()
    if cfg.train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.train.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    logs["grad_norm"] = norm.detach()
    # One host sync per step (as AMP's GradScaler makes): a non-finite loss or gradient must
    # reach neither the weights nor Adam's moments, so the step is decided here, on all ranks.
    finite = distributed.all_ranks(torch.isfinite(loss.detach() + norm.detach()))
    if finite:
        optimizer.step()
        model.objective.clamp_temperatures_()
    # The schedule moves on either way: steps, not updates, index the learning rate.
    schedule.step()
    return logs, finite


def _resume(checkpoint, checkpoints: Path, model, run: TrainingState) -> Path | None:
    """Restore ``checkpoint`` (the latest valid one, or None) into ``model`` and ``run``;
    returns its path."""
    if checkpoint is None:
        return None
    restore_model(model, checkpoint)
    run.load_state_dict(checkpoint.state, checkpoint.step)
    return checkpoint_path(checkpoints, checkpoint.step)
