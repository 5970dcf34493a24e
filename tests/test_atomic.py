"""Files complete or absent, and the cleanup of what killed writers leave."""

from __future__ import annotations

import os
import subprocess
import sys

from threetowers.atomic import remove_temporaries, temporary_path, write_atomic


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["config.yaml"]
    assert temporary_path(target).name == f".config.yaml.tmp-{os.getpid()}"


def test_shared_folders_keep_the_temporaries_of_live_writers(tmp_path):
    command = [sys.executable, "-c", "import os; print(os.getpid())"]
    finished = subprocess.run(command, text=True, capture_output=True, check=True)
    dead = tmp_path / f".cache.safetensors.tmp-{finished.stdout.strip()}"
    live = tmp_path / f".other.safetensors.tmp-{os.getpid()}"
    kept = tmp_path / "cache.safetensors"
    for path in (dead, live, kept):
        path.write_bytes(b"x")
    remove_temporaries(tmp_path, only_dead_writers=True)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, kept.name])
    remove_temporaries(tmp_path)  # a run directory: one writer, so everything goes
    assert os.listdir(tmp_path) == [kept.name]
