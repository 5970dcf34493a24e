"""files/safe_load.py: tensors and plain containers load; a pickle that would run code is
refused in one message, without running it, from every reader of third-tower weights
(feature caches: tests/data/caches/test_features.py)."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.helpers.pickles import Exploit
from threetowers.cli import main
from threetowers.errors import UserError
from threetowers.files.safe_load import UnsafeFileError, load_tensors


def test_tensors_and_plain_containers_load_on_the_cpu_unchanged(tmp_path):
    weights = {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "ids": torch.arange(5, dtype=torch.int64),
        "nested": [torch.ones(2, dtype=torch.float16), {"scale": 0.5, "name": "x"}],
    }
    path = tmp_path / "weights.pt"
    torch.save(weights, path)
    loaded = load_tensors(path)
    assert loaded.keys() == weights.keys()
    assert torch.equal(loaded["conv.weight"], weights["conv.weight"])
    assert loaded["ids"].dtype == torch.int64 and torch.equal(loaded["ids"], weights["ids"])
    assert loaded["nested"][0].dtype == torch.float16
    assert loaded["nested"][1] == {"scale": 0.5, "name": "x"}
    assert all(t.device.type == "cpu" for t in (loaded["conv.weight"], loaded["ids"]))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "x": Exploit(marker)}, path)
    with pytest.raises(UnsafeFileError) as caught:
        load_tensors(path)
    message = str(caught.value)
    assert message.startswith(f"{path} holds objects other than tensors")
    assert "safetensors" in message and "weights_only=False" not in message
    assert "\n" not in message  # one line: the command line prints it as it is
    assert not marker.exists()


def test_the_refusal_is_a_user_error_and_still_a_value_error(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(Exploit(tmp_path / "code_ran"), protocol=2))
    with pytest.raises(UnsafeFileError) as caught:
        load_tensors(path)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_third_tower_weights_with_code_are_refused_in_one_message(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "weights.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "x": Exploit(marker)}, evil)
    assert main(["summary", "tiny", f"model.frozen.0.path={evil}"]) == 2
    err = capsys.readouterr().err
    assert "holds objects other than tensors" in err and "refused" in err
    assert "Traceback" not in err and "weights_only=False" not in err
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
