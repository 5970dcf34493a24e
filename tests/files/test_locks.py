"""files/locks.py: one writer per folder. A second writer is refused (``exclusive``) or waits
(``waiting``); a holder's lock ends with its process however it ends, and is not inherited
by processes it forked (data-loader workers)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import threetowers
from threetowers.errors import UserError
from threetowers.files.locks import LOCK_NAME, LockedError, exclusive, waiting

PACKAGE = str(Path(threetowers.__file__).parent)

# The holder imports the package's own locks module without the package's __init__ (which
# loads torch), so that it holds the lock in a fraction of a second.
HOLDER = """
import os, sys, time, types
package = types.ModuleType("threetowers")
package.__path__ = [sys.argv[3]]
sys.modules["threetowers"] = package
from threetowers.files.locks import exclusive
with exclusive(sys.argv[1], "run directory", "wait for it"):
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:  # a worker forked while the lock is held: outlives its parent
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
    print("held", flush=True)
    sys.stdin.readline()  # hold until told to go (or killed)
"""


def hold(folder: Path, fork: bool = False) -> tuple[subprocess.Popen, int | None]:
    """Another threetowers process holding ``folder``'s lock; with ``fork``, also the pid of a
    process it forked while holding it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "fork" if fork else "-", PACKAGE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(process.stdout.readline()) if fork else None
    assert process.stdout.readline().strip() == "held"
    return process, child


def release(process: subprocess.Popen) -> None:
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.wait(timeout=30) == 0


def test_a_free_folder_is_created_locked_and_marked_with_the_holders_pid(tmp_path):
    folder = tmp_path / "new" / "run"
    with exclusive(folder, "run directory", "fix"):
        assert (folder / LOCK_NAME).read_text() == str(os.getpid())
    with exclusive(folder, "run directory", "fix"):  # released at the end of the block
        pass


def test_a_second_writer_is_refused_naming_the_folder_holder_and_fix(tmp_path):
    process, _ = hold(tmp_path)
    try:
        with pytest.raises(LockedError) as caught:
            with exclusive(tmp_path, "run directory", "wait for the first to finish"):
                pytest.fail("a second writer entered the locked block")
        assert str(caught.value) == (
            f"{tmp_path} is in use: another threetowers process (pid {process.pid}) is "
            "writing this run directory; wait for the first to finish"
        )
        assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    finally:
        release(process)
    with exclusive(tmp_path, "run directory", "fix"):  # free once the holder let go
        assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())


def test_a_waiting_writer_enters_when_the_holder_finishes(tmp_path, caplog):
    process, _ = hold(tmp_path)
    entered = threading.Event()

    def second() -> None:
        with waiting(tmp_path, "feature cache"):
            entered.set()

    with caplog.at_level(logging.INFO, logger="threetowers.files.locks"):
        thread = threading.Thread(target=second)
        thread.start()
        try:
            assert not entered.wait(0.5)  # still held by the other process
        finally:
            release(process)
        thread.join(timeout=30)
    assert entered.is_set()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        f"{tmp_path}: another threetowers process (pid {process.pid}) is writing this "
        "feature cache; waiting for it to finish"
    )


def test_a_killed_holder_leaves_no_lock_even_with_its_forked_workers_alive(tmp_path):
    process, worker = hold(tmp_path, fork=True)
    try:
        process.kill()
        process.wait(timeout=30)
        os.kill(worker, 0)  # the forked worker still runs
        with exclusive(tmp_path, "run directory", "fix"):
            assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())
    finally:
        os.kill(worker, signal.SIGKILL)
