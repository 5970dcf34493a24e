"""Training checkpoints written: atomic, the last K kept (their format and reading:
``files/checkpoints.py``).

A checkpoint is written into a temporary directory, fsynced, then renamed into place: a crash
at any moment leaves either the complete checkpoint or none.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from threetowers.files.atomic import fsync, remove_temporaries, temporary_path, whole_or_nothing
from threetowers.files.checkpoints import (
    FROZEN_PREFIX,
    META_DIGEST,
    checkpoint_path,
    checkpoints_of,
    meta_digest,
    step_of,
)
from threetowers.files.readback import file_sha256
from threetowers.model.legacy_keys import renamed_legacy_keys


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without the frozen towers."""
    return {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not k.startswith(FROZEN_PREFIX)
    }


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    return write_checkpoint(directory, step, trainable_state(model), state, meta, keep)


def write_checkpoint(
    directory: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep: int = 3,
    more: Callable[[Path], dict[str, str]] | None = None,
) -> Path:
    """The checkpoint of ``step`` with ``weights`` and ``state``; ``more(folder)`` writes
    further files into the checkpoint's temporary folder (fsynced) and returns their sha256
    by relative path, which meta.json records and a load checks like its own."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    shutil.rmtree(temporary_path(final), ignore_errors=True)
    with whole_or_nothing(final, _nbytes(weights) + _nbytes(state)) as tmp:
        tmp.mkdir()
        digests = more(tmp) if more is not None else {}
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        record = dict(meta or {}, step=step)
        files = ("model.safetensors", "state.pt")
        record["sha256"] = {name: file_sha256(tmp / name) for name in files} | digests
        record[META_DIGEST] = meta_digest(record)
        (tmp / "meta.json").write_text(json.dumps(record, indent=1))
        for name in ("model.safetensors", "state.pt", "meta.json"):
            fsync(tmp / name)
        fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
    _prune(directory, keep, step)
    return final


def load_matching(
    model: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """Load the tensors of ``weights`` (another run's) whose name and shape the model's
    trainable state has; returns the model's names left as they were and the names of
    ``weights`` not used, sorted."""
    weights = renamed_legacy_keys(weights)  # a run written before the loss was loss_fn
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}
    fitting = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return sorted(own.keys() - fitting.keys()), sorted(weights.keys() - fitting.keys())


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete what a killed writer left behind (never a complete checkpoint)."""
    remove_temporaries(directory)


def _prune(directory: Path, keep: int, step: int) -> None:
    """Keep the last ``keep`` checkpoints up to ``step``. Later ones are left alone: they are
    what a resume skipped as corrupt, kept for inspection (and replaced when training
    reaches their step); counting them would prune the checkpoint just written."""
    reached = [path for path in checkpoints_of(directory) if step_of(path) <= step]
    for old in reached[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _nbytes(tree: Any) -> int:
    """The tensor bytes in a state (what writing it takes, give or take its framing)."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(value) for value in tree)
    return 0
