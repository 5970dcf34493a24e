"""One writer at a time: an exclusive lock on a folder that a process is writing.

Two ``train`` processes on one run directory (or two ``index`` on one ``--out``) would each
unlink the other's temporaries and interleave their records: the second is refused. A
feature cache folder is shared by design (runs side by side read it): a second writer waits
for the first, then finds the units it wrote. The lock is a hidden ``.lock`` file held with a
POSIX record lock: the kernel releases it when its holder exits, however it exits, so a killed
writer never leaves a stale lock.

A POSIX record lock (``lockf``), not ``flock``: forked data-loader workers inherit an
``flock`` and hold it for seconds after their training process was killed, so the re-run
would be refused; record locks belong to the process alone. (They do not exclude two
holders in one process, which this tool never is.)
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from threetowers.errors import UserError

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)


class LockedError(UserError, ValueError):
    """Another process holds the lock: a user error (two commands on one folder)."""


@contextmanager
def exclusive(folder: str | Path, what: str, fix: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; :class:`LockedError` if another process holds it.

    ``what`` names the folder's role ("run directory"), ``fix`` what the user can do.
    """
    with _locked(folder, what, wait=False, fix=fix):
        yield


@contextmanager
def waiting(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, waiting (with one log line) while another
    process holds it."""
    with _locked(folder, what, wait=True, fix=""):
        yield


@contextmanager
def _locked(folder: str | Path, what: str, wait: bool, fix: str) -> Iterator[None]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            held = f"another threetowers process{_holder(path)} is writing this {what}"
            if not wait:
                raise LockedError(f"{folder} is in use: {held}; {fix}") from None
            log.info("%s: %s; waiting for it to finish", folder, held)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor of the lock releases it


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
