"""Load what a training run produced: its config, model weights and tokenizer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from threetowers.config import Config, load_config, read_mapping
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.files.checkpoints import (
    Checkpoint,
    check_frozen,
    check_tokenizer,
    load_checkpoint,
    load_latest,
    restore_model,
)
from threetowers.model.build import build_model, frozen_digests, frozen_sources
from threetowers.model.three_towers import ThreeTowers


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: Config
    model: ThreeTowers
    tokenizer: CaptionTokenizer
    step: int
    # Names these exact weights: what an index built from the run and the queries against it
    # must agree on (the trained weights' checksum and the model config, which fixes the
    # frozen towers).
    fingerprint: str


def find_checkpoint(path: str | Path) -> tuple[Path, Checkpoint]:
    """``path``: a run directory (its latest valid checkpoint) or one checkpoint directory of
    a run; returns the run directory and the checkpoint."""
    path = Path(path)
    if (path / "meta.json").is_file() and path.parent.name == "checkpoints":
        run_dir, checkpoint = path.parent.parent, load_checkpoint(path)
    else:
        run_dir, checkpoint = path, load_latest(path / "checkpoints")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{path} is neither a run directory nor a checkpoint of one (no config.yaml in "
            f"{run_dir}); pass the directory that `threetowers train` wrote"
        )
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no readable checkpoint yet; train it first")
    return run_dir, checkpoint


def trained_tokenizer(run_dir: Path, cfg: Config, checkpoint: Checkpoint) -> CaptionTokenizer:
    """The run's tokenizer.json, refused unless it is the one ``checkpoint`` was trained with."""
    path = run_dir / "tokenizer.json"
    tokenizer = CaptionTokenizer.load(path, cfg.model.text.context_length)
    check_tokenizer(checkpoint, tokenizer.digest(), str(path))
    return tokenizer


def load_trained(path: str | Path, device: str = "cpu", uses_frozen: bool = True) -> TrainedRun:
    """``path``: a run directory (its latest valid checkpoint) or one checkpoint directory.
    ``uses_frozen``: refuse frozen towers changed since the checkpoint was written (False: the
    caller reads f and g only, as an export does)."""
    run_dir, checkpoint = find_checkpoint(path)
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg, device=device)
    if uses_frozen:
        check_frozen(checkpoint, frozen_digests(model), frozen_sources(cfg.model))
    restore_model(model, checkpoint)
    tokenizer = trained_tokenizer(run_dir, cfg, checkpoint)
    identity = {
        "weights": checkpoint.meta["sha256"]["model.safetensors"],
        # as recorded, so that a run recorded in an earlier form of the config keeps the
        # fingerprint its search indexes hold
        "model": read_mapping(run_dir / "config.yaml").get("model"),
        "tokenizer": hashlib.sha256((run_dir / "tokenizer.json").read_bytes()).hexdigest(),
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return TrainedRun(run_dir, cfg, model.eval(), tokenizer, checkpoint.step, fingerprint)
