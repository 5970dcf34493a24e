"""A shard opened as a tar archive (``tar_samples`` scans it for its samples), whatever its
headers claim costing no more memory than its largest allowed member:

* no single read from a shard is larger than the largest member limit
  (:data:`MEMBER_LIMITS`), so tar's own extended headers (pax records, GNU long names),
  which :mod:`tarfile` reads whole, are bounded too; a larger one ends the shard where it
  stands, as a damaged header does;
* a shard is read as plain tar unless its name declares compression (``.tar.gz``/``.tgz``,
  ``.tar.bz2``/``.tbz2``, ``.tar.xz``/``.txz``): a compressed stream named ``.tar`` is not
  unpacked but counts, and streams, as one bad sample named after the shard
  (``compressed_shard``).

A remote shard (``remote.py``) is a stream: its bytes come once, in order. tarfile reads it
through a file that turns its seeks into reads (:class:`_Forward`: forward seeks read past
data in pieces, backward ones reach only the last few blocks, where the end-of-archive and
compression checks look), so a stream and a local file are opened, scanned and checked by
the same code. A remote shard of which nothing arrives, after the transport's retries, is
one bad sample (``unreachable_shard``), as an unopenable local shard is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from threetowers.data.sources import remote
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.remote_stream import RemoteStream

# What tarfile and the decompressors raise on damaged archives.
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
# Most bytes read for one member, by suffix; images and any other member get IMAGE_LIMIT.
# Captions and metadata: decode keeps at most 4096 characters of a caption, and
# img2dataset's metadata is a few KB; a megabyte of either is junk.
TEXT_LIMIT = 1 << 20
# Web images are well under a megabyte; a camera JPEG even at Pillow's decompression-bomb
# limit (~89 megapixels, which decode.load_image enforces) is a few tens of megabytes.
IMAGE_LIMIT = 64 << 20
MEMBER_LIMITS = {"txt": TEXT_LIMIT, "caption": TEXT_LIMIT, "json": TEXT_LIMIT}
# Compression is taken from the name only: sniffing it would unpack any stream named .tar.
_OPENERS: dict[str, Callable[..., IO[bytes]]] = {
    ".tar.gz": gzip.open,
    ".tgz": gzip.open,
    ".tar.bz2": bz2.open,
    ".tbz2": bz2.open,
    ".tar.xz": lzma.open,
    ".txz": lzma.open,
}
# Leading bytes of compressed streams, to say why a shard named .tar is unreadable.
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class _Capped:
    """A shard's file that refuses any one read over the largest member limit: tarfile reads
    an extended header whole, at whatever size its own header states."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file

    def read(self, size: int = -1) -> bytes:
        if not 0 <= size <= IMAGE_LIMIT:
            raise tarfile.ReadError(f"a read of {size} bytes, over the {IMAGE_LIMIT}-byte limit")
        return self.file.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class _Forward:
    """A stream read as tarfile reads a file: read ahead in pieces of :data:`_AHEAD` bytes
    (tarfile's many small reads then cost no call into the transport), a seek forward reads
    past the bytes between, a seek back reaches only the last :data:`_KEPT` bytes before
    where it stands, kept for the two checks that look back (the end-of-archive blocks, a
    compressed stream's first bytes)."""

    def __init__(self, file: IO[bytes], stream: RemoteStream) -> None:
        self.file, self.stream = file, stream  # the stream under any decompression
        self.position = 0  # where tarfile stands
        self.base = 0  # the offset of buffer[0]
        self.buffer = b""  # bytes read: up to _KEPT before position, and any read ahead

    @property
    def failure(self) -> str | None:
        return self.stream.failure

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset + (self.position if whence == 1 else 0)
        if whence not in (0, 1) or target < self.base:
            raise OSError(f"a stream cannot seek back to {target} (at {self.position})")
        self.position = target
        return target

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(_AHEAD), b""))
        end = self.base + len(self.buffer)
        while end < self.position:  # forward past bytes never read
            skipped = self.file.read(min(self.position - end, _SKIP))
            if not skipped:
                return b""
            end += len(skipped)
            self.base, self.buffer = end, b""
        start = self.position - self.base
        if start + size <= len(self.buffer):  # read ahead already
            data = self.buffer[start : start + size]
        elif size > _AHEAD:  # a member's data: straight from the file, one copy at most
            head = self.buffer[start:]
            data = head + self._read_fully(size - len(head))
            behind = (self.buffer[max(0, start - _KEPT) : start] + data[-_KEPT:])[-_KEPT:]
            self.base, self.buffer = self.position + len(data) - len(behind), behind
        else:  # the next piece, keeping the last _KEPT bytes before the position
            kept = self.buffer[max(0, start - _KEPT) :]
            self.base += len(self.buffer) - len(kept)
            start -= len(self.buffer) - len(kept)
            self.buffer = kept + self._read_fully(_AHEAD)
            data = self.buffer[start : start + size]
        self.position += len(data)
        return data

    def _read_fully(self, size: int) -> bytes:
        """``size`` bytes of the file, fewer only at its end."""
        parts, got = [], 0
        while got < size and (data := self.file.read(size - got)):
            parts.append(data)
            got += len(data)
        return b"".join(parts)  # one part (the usual): itself, not a copy

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.stream.close()


_AHEAD = 64 << 10
_KEPT = 8 * tarfile.BLOCKSIZE
_SKIP = 1 << 20


def open_archive(path: str | Path, stream: RemoteStream | None = None) -> tarfile.TarFile:
    """The shard as a tar archive, decompressed only as its name says; :class:`BadSample`
    (``truncated_shard``, ``compressed_shard``, or ``unreachable_shard`` for a ``stream``
    of which nothing came) when it cannot be read. Close its ``fileobj`` too: tarfile
    leaves a file it was given open."""
    url = str(path)
    name = url if stream is None else remote.tar_name(url)
    opener = next((o for end, o in _OPENERS.items() if name.endswith(end)), open)
    if stream is not None:
        file = _Forward(stream if opener is open else opener(stream, "rb"), stream)
        return _open_file(url, file, opener, stream)
    try:
        file = opener(path, "rb")
    except TAR_ERRORS as error:
        raise BadSample("truncated_shard", f"{url} is not a readable tar file ({error})") from None
    return _open_file(url, file, opener, None)


def _open_file(
    url: str, file: IO[bytes], opener: Callable, stream: RemoteStream | None
) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=_Capped(file), mode="r:")
    except TAR_ERRORS as error:
        kind = _compression(file) if opener is open else None
        file.close()
        if stream is not None and stream.failure is not None:
            if stream.received == 0:
                detail = f"{url} could not be read: {stream.failure}"
                raise BadSample("unreachable_shard", detail) from None
            detail = f"{url} is not a readable tar file ({error}; the transfer broke off: "
            raise BadSample("truncated_shard", f"{detail}{stream.failure})") from None
        if kind is not None:
            detail = (
                f"{url} is {kind}-compressed, but a shard is read as plain tar unless its name "
                "says otherwise (.tar.gz, .tar.bz2, .tar.xz): decompress it to a plain .tar"
            )
            raise BadSample("compressed_shard", detail) from None
        raise BadSample("truncated_shard", f"{url} is not a readable tar file ({error})") from None


def _compression(file: IO[bytes]) -> str | None:
    """The compression that a file's first bytes show, if any."""
    try:
        file.seek(0)
        start = file.read(6)
    except OSError:
        return None
    return next((kind for magic, kind in _MAGIC.items() if start.startswith(magic)), None)


def ends_whole(archive: tarfile.TarFile) -> bool:
    """Whether two zero blocks, the end-of-archive marker, follow the last member read.
    ``archive.offset`` is where tarfile stopped reading headers: the end of the last member
    (tarfile itself stops at the first zero block, or quietly at a cut)."""
    marker = 2 * tarfile.BLOCKSIZE
    try:
        archive.fileobj.seek(archive.offset)
        return archive.fileobj.read(marker) == bytes(marker)
    except TAR_ERRORS:
        return False
