"""Files complete or absent, and the cleanup of what killed writers leave."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from threetowers.files.atomic import NoSpaceError, remove_temporaries, temporary_path, write_atomic


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


def test_a_full_disk_keeps_the_old_file_and_says_where_and_how_much(small_disk):
    disk = small_disk(64)
    target = disk / "eval.json"
    write_atomic(target, "old")
    with pytest.raises(NoSpaceError) as error:
        write_atomic(target, b"x" * 200_000)
    assert str(error.value).startswith(
        f"not enough disk space in {disk} for {target}: it needs about 0.2 MiB, "
    )
    assert target.read_text() == "old" and os.listdir(disk) == ["eval.json"]
    small_disk.grow(disk, 1024)
    write_atomic(target, b"x" * 200_000)
    assert target.stat().st_size == 200_000
