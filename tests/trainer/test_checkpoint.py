"""Checkpoints: complete or absent, checksummed, safe to load, pruned."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import time
import warnings

import pytest
import torch

from tests.conftest import tiny_model
from threetowers.errors import UserError
from threetowers.files.atomic import NoSpaceError
from threetowers.files.checkpoints import (
    META_DIGEST,
    CheckpointError,
    load_checkpoint,
    load_latest,
    meta_digest,
    restore_model,
)
from threetowers.trainer.checkpoint import remove_stale_temporaries, save_checkpoint


def state(step: int) -> dict:
    return {"rng": torch.get_rng_state(), "epoch": 0, "batch_in_epoch": step, "lr": [0.1]}


def test_round_trip_leaves_out_the_frozen_tower(tmp_path):
    model = tiny_model("3t")
    path = save_checkpoint(tmp_path, 5, model, state(5), {"tokenizer": "abc"})
    loaded = load_checkpoint(path)
    assert loaded.step == 5 and loaded.meta["tokenizer"] == "abc"
    assert any(k.startswith("frozen.h.") for k in model.state_dict())
    assert not any(k.startswith("frozen.") for k in loaded.model)
    for key, value in model.state_dict().items():
        if not key.startswith("frozen."):
            assert torch.equal(loaded.model[key], value), key
    assert torch.equal(loaded.state["rng"], state(5)["rng"])


def test_keeps_the_last_k_and_latest_wins(tmp_path):
    model = tiny_model("clip")
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, model, state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000008"]
    assert load_latest(tmp_path).step == 8


def test_pruning_removes_only_the_checkpoints_it_wrote(tmp_path):
    model = tiny_model("clip")
    save_checkpoint(tmp_path, 20, model, state(20))
    backup = tmp_path / "step_00000020_keep"
    shutil.copytree(tmp_path / "step_00000020", backup)
    (tmp_path / "step_notes").mkdir()
    for step in (40, 60, 80):
        save_checkpoint(tmp_path, step, model, state(step), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000020_keep",
        "step_00000080",
        "step_notes",
    ]
    assert load_checkpoint(backup).step == 20


def test_a_resume_past_a_corrupt_checkpoint_never_prunes_its_new_one(tmp_path):
    model = tiny_model("clip")
    save_checkpoint(tmp_path, 20, model, state(20), keep=1)
    corrupt = save_checkpoint(tmp_path, 40, model, state(40), keep=2)
    (corrupt / "state.pt").write_bytes(b"flipped")
    with pytest.warns(UserWarning, match="step_00000040"):
        assert load_latest(tmp_path).step == 20
    save_checkpoint(tmp_path, 30, model, state(30), keep=1)  # training on from step 20
    with pytest.warns(UserWarning, match="step_00000040"):
        assert load_latest(tmp_path).step == 30  # kept: the corrupt 40 does not count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030", "step_00000040"]


def test_every_checkpoint_corrupt_stops_naming_each(tmp_path):
    model = tiny_model("clip")
    for step in (2, 4):
        path = save_checkpoint(tmp_path, step, model, state(step))
        (path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(CheckpointError) as error:
        load_latest(tmp_path)
    message = str(error.value)
    assert "step_00000002: model.safetensors does not match its checksum" in message
    assert "step_00000004: model.safetensors does not match its checksum" in message
    assert "To start over from step 0, move" in message


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_says_so(small_disk):
    disk = small_disk(2600)  # the model's ~1 MB twice, one ~1 MB optimizer state
    model = tiny_model("clip")
    save_checkpoint(disk, 2, model, state(2))
    moments = state(4) | {"exp_avg": torch.zeros(250_000)}  # torch.save runs out of space
    with pytest.raises(NoSpaceError) as error:
        save_checkpoint(disk, 4, model, moments)
    assert isinstance(error.value.__cause__, RuntimeError)  # torch.save's, not an OSError
    assert str(error.value).startswith(
        f"not enough disk space in {disk} for {disk / 'step_00000004'}: it needs about 1.9 MiB"
    )
    assert sorted(p.name for p in disk.iterdir()) == ["step_00000002"]
    assert load_latest(disk).step == 2
    small_disk.grow(disk, 8192)
    save_checkpoint(disk, 4, model, moments)
    assert load_latest(disk).step == 4


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
    partial = tmp_path / ".step_00000004.tmp-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    assert load_latest(tmp_path).step == 2
    remove_stale_temporaries(tmp_path)
    assert not partial.exists()


class Exploit:
    """Unpickling this runs code: here a harmless marker file, elsewhere anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def resign(path, name):
    """Update meta.json's checksums, so that only the safe loader stands in the way."""
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    meta[META_DIGEST] = meta_digest(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_state_file_with_code_is_refused_with_a_clear_error(tmp_path):
    model = tiny_model("clip")
    save_checkpoint(tmp_path, 2, model, state(2))
    path = save_checkpoint(tmp_path, 4, model, state(4))
    marker = tmp_path / "code_ran"
    torch.save({"x": Exploit(marker)}, path / "state.pt")  # a real torch.save zip, with code
    resign(path, "state.pt")
    with pytest.raises(CheckpointError, match="objects other than tensors.*refused"):
        load_checkpoint(path)
    bare = pickle.dumps({"x": Exploit(marker)}, protocol=2)  # a bare pickle, not a torch zip
    (path / "state.pt").write_bytes(bare)
    resign(path, "state.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="step_00000004.*refused"):
        assert load_latest(tmp_path).step == 2  # the previous one is used
    assert not marker.exists()


def test_a_flipped_digit_in_meta_json_never_moves_the_step(tmp_path):
    model = tiny_model("clip")
    save_checkpoint(tmp_path, 20, model, state(20))
    path = save_checkpoint(tmp_path, 40, model, state(40))
    text = (path / "meta.json").read_text()
    (path / "meta.json").write_text(text.replace('"step": 40', '"step": 48'))
    with pytest.raises(CheckpointError, match="meta.json does not match its checksum"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="step_00000040: meta.json does not match"):
        assert load_latest(tmp_path).step == 20


def test_a_checkpoint_written_before_meta_had_a_checksum_still_loads(tmp_path):
    path = save_checkpoint(tmp_path, 20, tiny_model("clip"), state(20))
    meta = json.loads((path / "meta.json").read_text())
    del meta[META_DIGEST]  # as the previous version wrote it
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    assert load_checkpoint(path).step == 20


def test_unreadable_meta_is_a_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path, 2, tiny_model("clip"), state(2))
    for text in ("{not json", '{"step": 2}', "[]"):
        (path / "meta.json").write_text(text)
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(path)


def write_checkpoints_forever(directory, model, name) -> None:
    weight = dict(model.named_parameters())[name]
    latest = load_latest(directory)
    for step in range(latest.step + 1 if latest else 1, 100_000):  # as a resumed run would
        with torch.no_grad():
            weight.fill_(step)  # each checkpoint's weights name its step
        save_checkpoint(directory, step, model, {"step": step}, keep=2)


def test_kill_at_random_moments_of_writing_never_leaves_a_readable_partial(tmp_path):
    """SIGKILL a process that writes checkpoints back to back, at seeded random moments:
    what the next run loads is always a whole checkpoint, and the leftovers get cleaned."""
    rng = random.Random(0)
    directory = tmp_path / "checkpoints"
    model = tiny_model("clip")
    name = next(iter(dict(model.named_parameters())))
    # forked, not spawned: a fresh interpreter would spend seconds importing torch
    fork = multiprocessing.get_context("fork")
    last = 0
    for _ in range(5):
        process = fork.Process(target=write_checkpoints_forever, args=(directory, model, name))
        process.start()
        deadline = time.time() + 60
        while len([p for p in directory.glob("step_*") if int(p.name[5:]) > last]) < 2:
            assert process.is_alive() and time.time() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no checkpoint may even be corrupt
            checkpoint = load_latest(directory)
        assert checkpoint.step >= 1 and checkpoint.state == {"step": checkpoint.step}
        assert torch.all(checkpoint.model[name] == checkpoint.step)
        last = max(last, checkpoint.step)
        remove_stale_temporaries(directory)
        assert not [p.name for p in directory.iterdir() if not p.name.startswith("step_")]
    assert last >= 5


def test_a_checkpoint_of_another_model_config_is_refused_as_a_user_error(tmp_path):
    path = save_checkpoint(tmp_path, 5, tiny_model("clip"), state(5), {})
    with pytest.raises(UserError, match="checkpoint step 5 does not fit this model"):
        restore_model(tiny_model("3t"), load_checkpoint(path))
