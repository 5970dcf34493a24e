"""The identity of a dataset's files, which names every cache made from them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from threetowers.data.caches.identity import files_digest


def resolved_one_by_one(paths) -> str:
    """The identity as first defined: caches and checkpoints already hold it, so it must
    not change."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            digest.update(f"{Path(path).resolve()}|missing\n".encode())
            continue
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def test_files_digest_is_the_resolved_identity_of_each_file(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "real" / name).write_bytes(name.encode() * 3)
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "c.png").symlink_to(tmp_path / "real" / "a.png")
    monkeypatch.chdir(tmp_path)
    paths = [
        tmp_path / "real" / "a.png",
        "linked/b.png",  # relative, through a linked folder
        Path("real") / "c.png",  # a linked file: its target's identity
        "real//./b.png",
        tmp_path / "real" / "gone.png",
    ]
    assert files_digest(paths) == resolved_one_by_one(paths)
    before = files_digest(paths)
    (tmp_path / "real" / "b.png").write_bytes(b"edited, and longer")
    assert files_digest(paths) != before
