"""Training checkpoints: atomic, self-checking, safe to load, the last K kept.

A checkpoint is a directory ``RUN/checkpoints/step_00001234/`` holding

    model.safetensors   the model's trainable state (the frozen towers are left out:
                        they are reloaded from their sources, their caches' fingerprints recorded)
    state.pt            optimizer, scheduler, RNG and data position; plain tensors and
                        containers only, read with ``torch.load(weights_only=True)``
    meta.json           step, sha256 of both files, data fingerprints (tokenizer, caches),
                        and the sha256 of all that (a flipped digit must not move the step)

written into a temporary directory, fsynced, then renamed into place: a crash at any moment
leaves either the complete checkpoint or none. A checkpoint whose checksums do not match, or
that holds anything but tensors and plain containers (a pickle that would run code), is
refused with :class:`CheckpointError`; :func:`load_latest` reports it and uses the previous.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from threetowers.errors import UserError
from threetowers.files.atomic import fsync, remove_temporaries, temporary_path, whole_or_nothing
from threetowers.files.readback import file_sha256
from threetowers.files.safe_load import UnsafeFileError, load_tensors
from threetowers.model.legacy_keys import renamed_legacy_keys

PREFIX = "step_"
_STEP = re.compile(rf"{PREFIX}\d{{8,}}")  # checkpoint_path's names
META_DIGEST = "meta_sha256"
FROZEN_PREFIX = "frozen."  # the frozen towers, reloaded from their sources


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used: corrupt, partly written, or holding more than data."""


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]
    path: Path | None = None  # where it was read from


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without the frozen towers."""
    return {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not k.startswith(FROZEN_PREFIX)
    }


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"{PREFIX}{step:08d}"


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
        record[META_DIGEST] = _meta_digest(record)
        (tmp / "meta.json").write_text(json.dumps(record, indent=1))
        for name in ("model.safetensors", "state.pt", "meta.json"):
            fsync(tmp / name)
        fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
    _prune(directory, keep, step)
    return final


def load_latest(directory: str | Path) -> Checkpoint | None:
    """The newest checkpoint that passes its checksums; corrupt ones are reported and skipped.

    None when there is no checkpoint. When there are some and none is usable, a
    :class:`CheckpointError` names each and its fault: starting again from step 0 would
    silently throw the run away, so that takes a deliberate step by the user.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    faults = []
    for path in reversed(_checkpoints(directory)):
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as error:
            faults.append(f"{path.name}: {error}")
            continue
        for fault in faults:
            warnings.warn(f"skipping checkpoint {directory / fault}", stacklevel=2)
        return checkpoint
    if faults:
        raise CheckpointError(
            f"no checkpoint in {directory} can be resumed from ({'; '.join(faults)}). To start "
            f"over from step 0, move {directory} aside (or train in a new run directory)"
        )
    return None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint directory; never runs code from it (safetensors, and
    ``torch.load(weights_only=True)``, which refuses any pickle that is not plain data)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        # checkpoints written before meta.json had its own checksum lack the key
        if META_DIGEST in meta and meta[META_DIGEST] != _meta_digest(meta):
            raise CheckpointError("meta.json does not match its checksum (corrupted or edited)")
        for name, digest in meta["sha256"].items():  # a sharded state's files too
            if file_sha256(path / name) != digest:
                raise CheckpointError(
                    f"{name} does not match its checksum (corrupted or partly written)"
                )
        model = load_file(str(path / "model.safetensors"))
        state = load_tensors(path / "state.pt")
        return Checkpoint(int(meta["step"]), model, state, meta, path)
    except UnsafeFileError as error:
        raise CheckpointError(str(error)) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable checkpoint ({error!r})") from None


def restore_model(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Load a checkpoint's weights; everything but the frozen towers must match."""
    missing, unexpected = model.load_state_dict(checkpoint.model, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIX)]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint step {checkpoint.step} does not fit this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the config changed since it was written"
        )


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


def check_tokenizer(checkpoint: Checkpoint | None, digest: str, where: str) -> None:
    """Refuse a tokenizer other than the one ``checkpoint`` was trained with: its token ids
    would silently stand for other words. ``where`` names the tokenizer's file or setting."""
    recorded = checkpoint.meta.get("tokenizer_sha256") if checkpoint is not None else None
    if recorded is not None and recorded != digest:
        raise CheckpointError(
            f"{where} is not the tokenizer that checkpoint step {checkpoint.step} was trained "
            f"with (sha256 {digest[:12]}..., recorded {recorded[:12]}...); restore that "
            "tokenizer.json, or train in a new run directory"
        )


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete what a killed writer left behind (never a complete checkpoint)."""
    remove_temporaries(directory)


def _checkpoints(directory: Path) -> list[Path]:
    """The checkpoints this tool wrote (``step_`` and the digits of a step; a user's
    ``step_00000020_keep`` is not one), oldest first."""
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and _STEP.fullmatch(p.name)]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def _prune(directory: Path, keep: int, step: int) -> None:
    """Keep the last ``keep`` checkpoints up to ``step``. Later ones are left alone: they are
    what a resume skipped as corrupt, kept for inspection (and replaced when training
    reaches their step); counting them would prune the checkpoint just written."""
    reached = [path for path in _checkpoints(directory) if _step_of(path) <= step]
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


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's record without this digest (its step, fingerprints, checksums)."""
    record = {key: value for key, value in meta.items() if key != META_DIGEST}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
