"""Files that are complete or absent: written beside their target, fsynced, renamed over it.

A ``kill -9`` at any moment leaves the old file or the new one, never a mix: a run that
resumes must not read half a config, tokenizer or checkpoint. What a killed writer leaves
behind is a hidden temporary named after its process (``.NAME.tmp-PID``), which the next
run removes.

A folder this tool fills (a world, an index) is cleaned only when it is the tool's own: it
holds the marker file that the tool writes before anything else there. A non-empty folder
without one is someone else's and is refused, never cleared.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from threetowers.errors import UserError
from threetowers.files.locks import LOCK_NAME

TMP_MARK = ".tmp-"


class NoSpaceError(UserError, OSError):
    """The disk is too full for a file the tool must write; nothing half-written is kept."""


def no_space(folder: str | Path, needed: int, what: str) -> NoSpaceError:
    """The one message for a full disk: where, how much, and that a re-run goes on."""
    free = shutil.disk_usage(folder).free
    return NoSpaceError(
        f"not enough disk space in {folder} for {what}: it needs about {_megabytes(needed)}, "
        f"{_megabytes(free)} are free; free some space and re-run the same command "
        "(finished work is kept)"
    )


def is_disk_full(error: BaseException, folder: str | Path, needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC or EDQUOT, or (libraries that wrap the
    error, as torch.save does) less space free than the write needs."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return shutil.disk_usage(folder).free < needed


def reserve(path: str | Path, size: int, what: str) -> None:
    """Allocate ``size`` bytes of ``path`` on the disk now. A memory-mapped file is created
    sparse: without this, a full disk would kill the process with SIGBUS mid-write."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        os.close(fd)
        fd = -1
        Path(path).unlink()  # a temporary: nothing of it is kept
        raise no_space(Path(path).parent, size, what) from None
    finally:
        if fd >= 0:
            os.close(fd)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


class ForeignFolderError(UserError, ValueError):
    """A folder the tool was asked to fill holds files it did not write."""


def refuse_foreign(folder: str | Path, markers: list[Path], what: str, option: str) -> None:
    """Refuse a non-empty ``folder`` that holds none of ``markers`` (the files this tool
    writes there first): clearing it would delete the user's own files. ``option`` is the
    setting that named the folder, for the message."""
    folder = Path(folder)
    if not folder.is_dir() or any(marker.exists() for marker in markers):
        return
    # Only our lock and temporaries may precede the marker.
    found = sorted(
        p.name for p in folder.iterdir() if p.name != LOCK_NAME and TMP_MARK not in p.name
    )
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ForeignFolderError(
            f"{option}={folder} is not empty ({shown}) and was not written by threetowers "
            f"(no {markers[0].name}), so writing the {what} there could delete those files; "
            f"give {option} a new or empty folder"
        )


def temporary_path(path: str | Path) -> Path:
    """Where ``path`` is written before it is renamed into place (same folder, same disk)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    data = data.encode("utf-8") if isinstance(data, str) else data
    with whole_or_nothing(path, len(data)) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file, written whole or not at all."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    needed = sum(v.numel() * v.element_size() for v in tensors.values())
    with whole_or_nothing(path, needed) as tmp:
        save_file(tensors, str(tmp), metadata)
        fsync(tmp)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """A ``.npy`` file, written whole or not at all."""
    with whole_or_nothing(path, array.nbytes) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def whole_or_nothing(path: str | Path, needed: int) -> Iterator[Path]:
    """The temporary that the block writes ``path`` into (and fsyncs), published when the
    block ends; when it fails, the temporary is removed (and a full disk says so)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
    except BaseException as error:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise_if_disk_full(error, path.parent, str(path), needed)
        raise
    publish(tmp, path)


def raise_if_disk_full(
    error: BaseException, folder: str | Path, what: str, needed: int | Callable[[], int]
) -> None:
    """Raise the one :class:`NoSpaceError` for ``error`` if it came from a full disk while
    writing ``what`` (``needed`` bytes, or a function giving them) into ``folder``: libraries
    report it as OSError, RuntimeError (torch.save, FAISS) or their own error."""
    if isinstance(error, NoSpaceError):
        return
    if isinstance(error, (OSError, RuntimeError, SafetensorError)):
        size = needed() if callable(needed) else needed
        if is_disk_full(error, folder, size):
            raise no_space(folder, size, what) from error


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary (file or directory, already fsynced) into place, durably."""
    os.replace(tmp, path)
    fsync(path.parent)  # the rename itself survives a power cut only once its folder is synced


def fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(directory: str | Path, only_dead_writers: bool = False) -> None:
    """Delete the temporaries that killed writers left in ``directory``.

    A run directory has one writer, so everything there is stale when a run starts. Shared
    folders (the feature cache) may hold the temporaries of a live process writing beside
    us: ``only_dead_writers`` keeps those whose process still runs.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for tmp in directory.glob(f".*{TMP_MARK}*"):
        pid = tmp.name.rpartition(TMP_MARK)[2]
        if only_dead_writers and pid.isdigit() and _running(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
