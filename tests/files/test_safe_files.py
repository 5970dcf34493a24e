"""Third-tower files never run code from a crafted file: clear refusals (feature caches:
tests/data/caches/test_features.py)."""

from __future__ import annotations

import pickle

import pytest
import torch

from threetowers.cli import main
from threetowers.files.safe_load import UnsafeFileError


class Exploit:
    """Unpickling this runs code: here it creates a marker file, elsewhere anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_third_tower_weights_with_code_are_refused_in_one_message(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "weights.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "x": Exploit(marker)}, evil)
    assert main(["summary", "tiny", f"model.third.path={evil}"]) == 2
    err = capsys.readouterr().err
    assert "holds objects other than tensors" in err and "refused" in err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert not marker.exists()


def test_a_pickle_posing_as_a_classifier_checkpoint_is_refused(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "classifier.safetensors"
    evil.write_bytes(pickle.dumps(Exploit(marker)))
    argv = ["summary", "tiny", "model.third.backbone=checkpoint", f"model.third.path={evil}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and "Traceback" not in err
    assert not marker.exists()


def test_hugging_face_weights_with_code_are_refused(tmp_path):
    pytest.importorskip("transformers")
    from tests.helpers.hf_models import _save_vit
    from threetowers.backbones.hf import load_hf_backbone

    marker = tmp_path / "code_ran"
    model = _save_vit(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.vit.state_dict() | {"x": Exploit(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="refused"):
        load_hf_backbone(tmp_path)
    assert not marker.exists()
