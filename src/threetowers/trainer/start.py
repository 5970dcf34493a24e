"""A run's start: the config it trains, the checkpoint it resumes or the weights it starts
from, its benchmarks, its model and its data, in that order.

What a user can get wrong is checked before any long work (training the tokenizer, building
the frozen towers' caches): the run directory's checkpoints and config, every benchmark
path, ``train.init_from`` and the data. config.yaml is written only then, so the corrected
command of a start that failed runs in the same directory (``trainer/run_dir.py``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from threetowers import distributed
from threetowers.config import Config, ConfigError, load_config
from threetowers.data.pipeline import TrainingData, open_data
from threetowers.data.sources.table import PairTable
from threetowers.data.views import Towers
from threetowers.errors import UserError
from threetowers.evaluation.benchmark_sets import Benchmarks, resolve_benchmarks
from threetowers.evaluation.chance import chance_levels
from threetowers.files.atomic import write_atomic
from threetowers.files.checkpoints import (
    Checkpoint,
    check_frozen,
    check_tokenizer,
    checkpoint_path,
    load_latest,
    restore_model,
)
from threetowers.model.build import build_model, frozen_digests, frozen_sources
from threetowers.model.three_towers import ThreeTowers
from threetowers.model.trained import find_checkpoint, trained_tokenizer
from threetowers.project.world.default import default_world
from threetowers.trainer.checkpoint import load_matching, remove_stale_temporaries
from threetowers.trainer.run_dir import config_to_train, prepare_run_dir, record_config
from threetowers.trainer.sharded_checkpoint import restore_sharded
from threetowers.trainer.state import TrainingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Start:
    """What a start hands the loop."""

    cfg: Config  # the config this start trains (a continuation's records its history)
    resumed: Checkpoint | None  # the checkpoint it resumes; None: it starts at step 0
    benchmarks: Benchmarks | None  # rank 0's (the only rank that evaluates)
    model: ThreeTowers
    data: TrainingData


def start(cfg: Config, run_dir: Path, device: torch.device, progress: bool) -> Start:
    """Everything a run needs before its first step but the optimizer. Rank 0 first, as it
    writes the run directory, the world and the tokenizer the other ranks then read; then the
    training data on every rank at once: each builds its share of the frozen towers' caches
    (``data/caches/sharded.py``), and the first to lock the preloaded pixels writes them while
    the others wait. The ranks wait for each other through ``distributed.meet`` (no training
    collective's timeout)."""
    main = distributed.is_main()
    with distributed.main_first():
        cfg, resumed = _admit(cfg, run_dir, main)
    _check_resumed_alike(resumed, run_dir)
    with distributed.main_first():
        init = _init_from(cfg, run_dir, main) if resumed is None and cfg.train.init_from else None
        world = default_world(cfg)  # the embedded world, when it is the data
        benchmarks = _benchmarks(cfg, world) if main else None
        opened = open_data(cfg, run_dir, world)  # the data opened, the tokenizer trained
        if main:  # the data and every path opened: this start is the run's
            record_config(cfg, run_dir)
            _say_if_blind(cfg, benchmarks)
        tokenizer = cfg.data.tokenizer or run_dir / "tokenizer.json"
        check_tokenizer(resumed, opened.tokenizer.digest(), str(tokenizer))
        model = build_model(cfg, device=device)
        towers = towers_of(model)
        check_frozen(resumed, towers.digests, frozen_sources(cfg.model))
        if init is not None:
            _initialise(model, init, cfg.train.init_from)
    _check_ranks(resumed, cfg, opened.pairs, run_dir)  # before the caches are built
    data = TrainingData(cfg, opened, towers, progress)
    if main:
        write_atomic(run_dir / "chance.json", json.dumps(chance_levels(benchmarks), indent=1))
    return Start(cfg, resumed, benchmarks, model, data)


def towers_of(model: ThreeTowers) -> Towers:
    """What the training data must know of ``model``: its views and frozen towers."""
    structure = model.structure
    return Towers(
        image=model.image_preprocessing,
        trains_image=model.image_tower is not None,
        frozen_images={name: model.frozen[name] for name in structure.image_towers},
        frozen_text={name: model.frozen[name] for name in structure.text},
        aligned=tuple(structure.aligned),
        digests=frozen_digests(model),
    )


def resume(
    checkpoint: Checkpoint | None,
    run_dir: Path,
    model: ThreeTowers,
    run: TrainingState,
    sharded: bool = False,
) -> Path | None:
    """Restore ``checkpoint`` (the latest valid one, or None) into ``model`` and ``run``;
    returns its path. ``sharded`` (``train.parallel: fsdp``): the weights and the optimizer
    from its ``sharded/`` folder, into this rank's shards."""
    if checkpoint is None:
        return None
    if sharded:
        restore_sharded(model, run.optimizer, checkpoint)
    else:
        restore_model(model, checkpoint)
    run.load_state_dict(checkpoint.state, checkpoint.step)
    return checkpoint_path(run_dir / "checkpoints", checkpoint.step)


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


def _check_resumed_alike(resumed: Checkpoint | None, run_dir: Path) -> None:
    """Every rank resumes the checkpoint rank 0 resumes; else one message on every rank,
    before any long work."""
    where = run_dir / "checkpoints"
    mine = None if resumed is None else (resumed.step, resumed.meta.get("sha256"))
    every = distributed.all_gather_objects(mine)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            raise UserError(
                f"rank {rank} resumed {_named(theirs)} from {where} but rank 0 resumed "
                f"{_named(every[0])}: the ranks do not see one run directory. Put "
                f"{run_dir} on a filesystem that every node shares"
            )


def _check_ranks(resumed: Checkpoint | None, cfg: Config, pairs, run_dir: Path) -> None:
    """A checkpoint resumes on another number of ranks where its data position means the
    same pairs there: a table's (its global batch b is the same rows at any number of
    ranks, ``data/sources/plan.py``), not shards' (each rank reads shards of its own, so the
    rest of an epoch is planned for the ranks that began it). Weights and optimizer follow
    either way (whole under DDP; resharded under fsdp)."""
    made_by = None if resumed is None else resumed.state.get("world_size")  # older: unsaid
    now = distributed.world_size()
    if made_by is None or made_by == now:
        return
    where = checkpoint_path(run_dir / "checkpoints", resumed.step)
    if cfg.data.preload or isinstance(pairs, PairTable):
        log.info(
            "%s was saved by %d rank(s) and resumes on %d: its table's global batches are the "
            "same pairs at any number of ranks",
            where,
            made_by,
            now,
        )
        return
    raise UserError(
        f"{where} was saved by a run of {made_by} rank(s) and this start has {now}: each rank "
        "reads shards of its own, so the rest of the epoch is planned for "
        f"{made_by} rank(s). Resume it on {made_by} rank(s) (torchrun's nodes x processes "
        f"per node), or start a new run from its weights with train.init_from={run_dir}"
    )


def _named(resumed: tuple | None) -> str:
    return "no checkpoint" if resumed is None else f"the checkpoint of step {resumed[0]}"


def _benchmarks(cfg: Config, world: dict | None) -> Benchmarks:
    """The benchmarks, their paths checked (the embedded world's manifest names its own)."""
    defaults = None if world is None else world["benchmarks"]
    return resolve_benchmarks(cfg.eval, defaults, cfg.data.allow_absolute_paths)


def _say_if_blind(cfg: Config, benchmarks: Benchmarks) -> None:
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
