"""A resume, and a loaded run, check that the frozen towers are the ones the checkpoint was
trained with: each tower's digest is recorded in the checkpoint, and a tower changed where the
config reads it (a file or folder rewritten in place) is refused before its caches are built."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.classifiers import make_classifier
from tests.helpers.runs import tiny_run_config, write_config
from threetowers.backbones.classifier import (
    load_classifier_backbone,
    save_classifier,
)
from threetowers.backbones.trained_pair import load_run_pair
from threetowers.cli import main
from threetowers.files.checkpoints import (
    FROZEN_SHA256,
    Checkpoint,
    CheckpointError,
    check_frozen,
)
from threetowers.model.trained import load_trained


def save_frozen_tower(path, seed: int) -> None:
    save_classifier(path, make_classifier(seed))


def test_a_frozen_tower_changed_in_place_is_refused_at_resume(world_dir, tmp_path, capsys):
    weights = tmp_path / "tower.safetensors"
    save_frozen_tower(weights, seed=0)
    cache = tmp_path / "cache"
    cfg = tiny_run_config(
        world_dir,
        cache,
        "model.mode=3t",
        "model.frozen.0.backbone=checkpoint",
        f"model.frozen.0.path={weights}",
        "model.frozen.0.image_size=16",
        "train.steps=2",
        "train.checkpoint_every=1",
    )
    config, run = write_config(cfg, tmp_path / "run.yaml"), tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 0
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta[FROZEN_SHA256 + "h"] == load_classifier_backbone(weights).digest()

    shutil.rmtree(run / "checkpoints" / "step_00000002")  # so that the run resumes step 1
    caches_before = sorted(cache.iterdir())
    save_frozen_tower(weights, seed=1)  # the same architecture, other weights, same path
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        "threetowers train: error: checkpoint step 1 was trained with other frozen towers: "
        f"model.frozen[0] 'h' (checkpoint at {weights}) (sha256 "
    ), error
    assert error.endswith(
        "changed since. Put back the weights it was trained with where the config reads them, "
        "or train in a new run directory"
    )
    assert sorted(cache.iterdir()) == caches_before  # refused before the new tower's cache
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert main(["eval", str(run)]) == 2  # a loaded run is checked too
    assert "was trained with other frozen towers: model.frozen[0] 'h'" in capsys.readouterr().err
    # what reads f and g only (an export, a frozen pair) does not need the frozen towers
    assert load_trained(run, uses_frozen=False).step == 1
    assert load_run_pair(run).image.feature_dim == cfg.model.embed_dim

    save_frozen_tower(weights, seed=0)  # put back: the run resumes and finishes
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 0
    assert (run / "checkpoints" / "step_00000002").is_dir()


def checkpoint_with(meta: dict) -> Checkpoint:
    return Checkpoint(3, {}, {}, {"step": 3} | meta, None)


def test_check_frozen_names_every_changed_tower_and_passes_what_was_not_recorded():
    sources = {"kimg": "model.frozen[1] 'k' (pair at /t)'s image side", "h": "model.frozen[0]"}
    digests = {"h": "a" * 64, "kimg": "b" * 64, "ktxt": "c" * 64}
    recorded = {FROZEN_SHA256 + "h": "a" * 64, FROZEN_SHA256 + "kimg": "d" * 64}
    check_frozen(None, digests, sources)  # a start, not a resume
    check_frozen(checkpoint_with({}), digests, sources)  # written before digests were recorded
    check_frozen(checkpoint_with(recorded | {FROZEN_SHA256 + "kimg": "b" * 64}), digests, sources)
    recorded[FROZEN_SHA256 + "ktxt"] = "e" * 64  # a side without a source: named by its key
    with pytest.raises(CheckpointError) as refused:
        check_frozen(checkpoint_with(recorded), digests, sources)
    message = str(refused.value)
    assert message.startswith(
        "checkpoint step 3 was trained with other frozen towers: "
        "model.frozen[1] 'k' (pair at /t)'s image side (sha256 bbbbbbbbbbbb..., recorded "
        "dddddddddddd...); 'ktxt' (sha256 cccccccccccc..., recorded eeeeeeeeeeee...) changed since."
    ), message
