"""Checkpoints: complete or absent, checksummed, safe to load, pruned."""

from __future__ import annotations

import pickle

import pytest
import torch

from tests.conftest import tiny_model
from threetowers.checkpoint import (
    load_checkpoint,
    load_latest,
    remove_stale_temporaries,
    save_checkpoint,
)


def state(step: int) -> dict:
    return {"rng": torch.get_rng_state(), "epoch": 0, "batch_in_epoch": step, "lr": [0.1]}


def test_round_trip_leaves_out_the_frozen_tower(tmp_path):
    model = tiny_model("3t")
    path = save_checkpoint(tmp_path, 5, model, state(5), {"tokenizer": "abc"})
    loaded = load_checkpoint(path)
    assert loaded.step == 5 and loaded.meta["tokenizer"] == "abc"
    assert not any(k.startswith("third_tower.") for k in loaded.model)
    for key, value in model.state_dict().items():
        if not key.startswith("third_tower."):
            assert torch.equal(loaded.model[key], value), key
    assert torch.equal(loaded.state["rng"], state(5)["rng"])


def test_keeps_the_last_k_and_latest_wins(tmp_path):
    model = tiny_model("clip")
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, model, state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000008"]
    assert load_latest(tmp_path).step == 8


def test_corrupt_latest_is_reported_and_the_previous_used(tmp_path):
    model = tiny_model("clip")
    save_checkpoint(tmp_path, 2, model, state(2))
    latest = save_checkpoint(tmp_path, 4, model, state(4))
    data = bytearray((latest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (latest / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_00000004.*does not match its checksum"):
        assert load_latest(tmp_path).step == 2


def test_half_written_checkpoint_is_never_read_and_gets_cleaned(tmp_path):
    model = tiny_model("clip")
    save_checkpoint(tmp_path, 2, model, state(2))
    partial = tmp_path / ".tmp-step_00000004-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    assert load_latest(tmp_path).step == 2
    remove_stale_temporaries(tmp_path)
    assert not partial.exists()


def test_state_file_with_code_is_refused(tmp_path):
    model = tiny_model("clip")
    path = save_checkpoint(tmp_path, 2, model, state(2))

    class Exploit:
        def __reduce__(self):
            return (print, ("code ran",))

    (path / "state.pt").write_bytes(pickle.dumps({"x": Exploit()}))
    # Re-sign the file so that only the weights_only loader stands in the way.
    import hashlib
    import json

    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"]["state.pt"] = hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
