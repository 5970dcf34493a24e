"""One writer at a time: an exclusive ``flock`` on a folder that a process is writing.

Two ``train`` processes on one run directory (or two ``index`` on one ``--out``, or two
cache builds of one unit) would each unlink the other's temporaries and interleave their
records. The lock is a hidden ``.lock`` file held with ``fcntl.flock``: the kernel releases
it when its holder exits, however it exits, so a killed writer never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class LockedError(ValueError):
    """Another process holds the lock: a user error (two commands on one folder)."""


@contextmanager
def exclusive(folder: str | Path, what: str, fix: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; raise :class:`LockedError` if another holds it.

    ``what`` names the folder's role ("run directory"), ``fix`` what the user can do.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with try_exclusive(folder) as held:
        if not held:
            holder = _holder(folder / LOCK_NAME)
            raise LockedError(
                f"{folder} is in use: another threetowers process{holder} is writing this "
                f"{what}; {fix}"
            )
        yield


@contextmanager
def try_exclusive(folder: str | Path) -> Iterator[bool]:
    """Take ``folder``'s lock if it is free; yields whether this process holds it."""
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
