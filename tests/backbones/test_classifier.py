"""The classifier checkpoint format: round trip, use as a third tower, refusals."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import threetowers as tt
from tests.helpers.classifiers import ARCH, make_classifier
from tests.helpers.pickles import Exploit
from threetowers.backbones.classifier import (
    ClassifierCheckpointError,
    load_classifier,
    load_classifier_backbone,
    save_classifier,
)
from threetowers.cli import main


def test_round_trip_restores_weights_metadata_and_logits(tmp_path):
    original = make_classifier()
    path = tmp_path / "objects.safetensors"
    save_classifier(path, original)
    loaded = load_classifier(path)
    assert loaded.class_names == original.class_names
    assert loaded.preprocessing == original.preprocessing
    assert loaded.architecture_config == ARCH
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(images), original.logits(images))


def test_checkpoint_serves_as_a_frozen_tower(tmp_path):
    original = make_classifier()
    path = tmp_path / "objects.safetensors"
    save_classifier(path, original)
    backbone = load_classifier_backbone(path)
    assert backbone.feature_dim == 24 and backbone.preprocessing.mean == (0.1, 0.2, 0.3)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), original.backbone.eval()(images))
    cfg = tt.load_config(
        "tiny", ["model.frozen.0.backbone=checkpoint", f"model.frozen.0.path={path}"]
    )
    model = tt.build_model(cfg)
    assert model.frozen["h"].feature_dim == 24
    assert not any(p.requires_grad for p in model.frozen["h"].parameters())


def test_refuses_files_that_are_not_classifier_checkpoints(tmp_path):
    with pytest.raises(ClassifierCheckpointError, match="not found; make one with"):
        load_classifier(tmp_path / "missing.safetensors")
    pickle_file = tmp_path / "model.safetensors"
    torch.save({"weight": torch.zeros(2)}, pickle_file)
    with pytest.raises(ClassifierCheckpointError, match="not a readable safetensors file"):
        load_classifier(pickle_file)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ClassifierCheckpointError, match="not a threetowers classifier checkpoint"):
        load_classifier(plain)


def test_refuses_inconsistent_contents(tmp_path):
    path = tmp_path / "objects.safetensors"
    save_classifier(path, make_classifier())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    wrong_arch = dict(metadata, architecture_config=json.dumps(dict(ARCH, width=32)))
    save_file(tensors, str(path), metadata=wrong_arch)
    with pytest.raises(ClassifierCheckpointError, match="inconsistent checkpoint"):
        load_classifier(path)
    save_file(tensors, str(path), metadata=dict(metadata, version="9"))
    with pytest.raises(ClassifierCheckpointError, match="version '9'"):
        load_classifier(path)
    save_file(tensors, str(path), metadata=dict(metadata, architecture="resnet"))
    with pytest.raises(ClassifierCheckpointError, match="unknown architecture 'resnet'"):
        load_classifier(path)


def test_save_checks_head_against_class_names(tmp_path):
    classifier = make_classifier()
    classifier.class_names = ["only", "two"]
    with pytest.raises(ValueError, match="3 outputs but 2 class names"):
        save_classifier(tmp_path / "x.safetensors", classifier)


def test_a_pickle_posing_as_a_classifier_checkpoint_is_refused(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "classifier.safetensors"
    evil.write_bytes(pickle.dumps(Exploit(marker)))
    argv = ["summary", "tiny", "model.frozen.0.backbone=checkpoint", f"model.frozen.0.path={evil}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and "Traceback" not in err
    assert not marker.exists()
