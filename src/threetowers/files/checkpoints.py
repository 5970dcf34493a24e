"""Training checkpoints: their format, and reading them back (checksummed, safe to load).

A checkpoint is a directory ``RUN/checkpoints/step_00001234/`` holding

    model.safetensors   the model's trainable state (the frozen towers are left out:
                        they are reloaded from their sources, their caches' fingerprints recorded)
    state.pt            optimizer, scheduler, RNG and data position; plain tensors and
                        containers only, read with ``torch.load(weights_only=True)``
    meta.json           step, sha256 of both files, data fingerprints (tokenizer, frozen
                        towers, caches), and the sha256 of all that (a flipped digit must
                        not move the step)

A checkpoint whose checksums do not match, or that holds anything but tensors and plain
containers (a pickle that would run code), is refused with :class:`CheckpointError`;
:func:`load_latest` reports it and uses the previous. The trainer writes them
(``trainer/checkpoint.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from threetowers.errors import UserError
from threetowers.files.readback import file_sha256
from threetowers.files.safe_load import UnsafeFileError, load_tensors

PREFIX = "step_"
_STEP = re.compile(rf"{PREFIX}\d{{8,}}")  # checkpoint_path's names
META_DIGEST = "meta_sha256"
FROZEN_PREFIX = "frozen."  # the frozen towers, reloaded from their sources
FROZEN_SHA256 = "frozen_sha256/"  # meta.json: each frozen tower's digest, by its name


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used: corrupt, partly written, or holding more than data."""


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]
    path: Path | None = None  # where it was read from


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"{PREFIX}{step:08d}"


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
    for path in reversed(checkpoints_of(directory)):
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
        if META_DIGEST in meta and meta[META_DIGEST] != meta_digest(meta):
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


def check_frozen(
    checkpoint: Checkpoint | None, digests: Mapping[str, str], sources: Mapping[str, str]
) -> None:
    """Refuse frozen towers other than those ``checkpoint`` was trained with (``digests``,
    by tower name; ``sources`` says where each is configured): a folder rewritten in place or
    a model updated where it is read from would change f and g's targets mid-run. Checkpoints
    written before the digests were recorded resume as before."""
    if checkpoint is None:
        return
    changed = [
        f"{sources.get(name, repr(name))} (sha256 {digest[:12]}..., recorded {recorded[:12]}...)"
        for name, digest in sorted(digests.items())
        if (recorded := checkpoint.meta.get(FROZEN_SHA256 + name)) not in (None, digest)
    ]
    if changed:
        raise CheckpointError(
            f"checkpoint step {checkpoint.step} was trained with other frozen towers: "
            f"{'; '.join(changed)} changed since. Put back the weights it was trained with "
            "where the config reads them, or train in a new run directory"
        )


def checkpoints_of(directory: Path) -> list[Path]:
    """The checkpoints this tool wrote (``step_`` and the digits of a step; a user's
    ``step_00000020_keep`` is not one), oldest first."""
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and _STEP.fullmatch(p.name)]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's record without this digest (its step, fingerprints, checksums)."""
    record = {key: value for key, value in meta.items() if key != META_DIGEST}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
