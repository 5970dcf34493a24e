"""Checkpoints of ``train.parallel: fsdp`` runs: every rank writes its shard.

Such a checkpoint holds what every checkpoint holds (``files/checkpoints.py``):
model.safetensors, the trained weights whole, which every reader of a run loads (evaluation,
export, embed, search, ``train.init_from``); state.pt, the run's state but the optimizer;
meta.json. And ``sharded/``: the trained weights and Adam's state as
``torch.distributed.checkpoint`` writes them, a file per rank holding that rank's shard. A
resume reads ``sharded/`` into however many ranks it has (one process included), each
taking its new shard: the weights and the optimizer reshard. meta.json records the sha256
of every file, each rank's hashed by that rank, and a load checks them all.

Every rank calls :func:`save_sharded_checkpoint`; the ranks wait for each other outside the
training collectives (``distributed.meet``), however long the writing takes.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from threetowers import distributed
from threetowers.files.atomic import fsync
from threetowers.files.checkpoints import (
    FROZEN_PREFIX,
    Checkpoint,
    CheckpointError,
    checkpoint_path,
)
from threetowers.files.readback import file_sha256
from threetowers.model.three_towers import ThreeTowers
from threetowers.trainer.checkpoint import write_checkpoint
from threetowers.trainer.sharding import full_trainable_state

SHARDED = "sharded"  # the folder torch.distributed.checkpoint writes in a checkpoint


def save_sharded_checkpoint(
    directory: Path,
    step: int,
    model: ThreeTowers,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """The checkpoint of ``step``: rank 0 writes model.safetensors, state.pt (``state``
    without its optimizer) and meta.json and publishes the folder; every rank writes its
    shard of ``sharded/`` into it first."""
    weights = full_trainable_state(model)  # a collective: rank 0 gets them whole
    if not distributed.is_main():
        _write_shards(_rank_0s(None), model, optimizer)
        distributed.meet()  # rank 0 has published the checkpoint
        return checkpoint_path(directory, step)
    run_state = {key: value for key, value in state.items() if key != "optimizer"}

    def shards(folder: Path) -> dict[str, str]:
        return _write_shards(_rank_0s(folder), model, optimizer)

    path = write_checkpoint(directory, step, weights, run_state, meta, keep, shards)
    distributed.meet()
    return path


def restore_sharded(
    model: ThreeTowers, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint
) -> None:
    """Load ``checkpoint``'s weights and Adam's state into this rank's shards."""
    folder = checkpoint.path / SHARDED
    if not folder.is_dir():
        raise CheckpointError(
            f"{checkpoint.path} has no {SHARDED}/ folder, so it was not written by a run with "
            "train.parallel=fsdp; resume it with the train.parallel it was made with"
        )
    state = _sharded_state(model, optimizer)
    with _coordinated() as group:
        dcp.load(state, checkpoint_id=folder, process_group=group, no_dist=group is None)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _sharded_state(model: ThreeTowers, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the trained weights and Adam's state, keyed by parameter name
    (which is what lets another number of ranks read them)."""
    weights = get_model_state_dict(model)
    trained = {key: value for key, value in weights.items() if not key.startswith(FROZEN_PREFIX)}
    return {"model": trained, "optimizer": get_optimizer_state_dict(model, optimizer)}


@contextmanager
def _coordinated():
    """The group the ranks coordinate a save or load in: the long phases', outside the
    training collectives' timeout. None in one process, where torch warns that it assumes
    one process: silenced, as it would only tell the user what they ran."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield distributed.long_phase_group()


def _rank_0s(folder: Path | None) -> Path:
    """Rank 0's ``folder``, on every rank (rank 0 names the checkpoint's temporary)."""
    return distributed.all_gather_objects(folder)[0]


def _write_shards(folder: Path, model: ThreeTowers, optimizer) -> dict[str, str]:
    """Write this rank's shard into ``folder/sharded``; returns the sha256 of every rank's
    files there (each rank hashes its own), by path in the checkpoint."""
    target = folder / SHARDED
    writer = dcp.FileSystemWriter(target, sync_files=True)
    state = _sharded_state(model, optimizer)
    with _coordinated() as group:
        dcp.save(state, storage_writer=writer, process_group=group, no_dist=group is None)
    rank = distributed.rank()
    mine = list(target.glob(f"__{rank}_*")) + ([target / ".metadata"] if rank == 0 else [])
    digests = {f"{SHARDED}/{file.name}": file_sha256(file) for file in mine}
    every = distributed.all_gather_objects(digests)
    if rank == 0:
        fsync(target)
    return {name: digest for part in every for name, digest in part.items()}
