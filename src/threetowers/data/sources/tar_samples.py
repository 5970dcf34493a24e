"""Samples of local tar shards: one scan serves both the plan (headers) and the stream (data).

A sample is a run of consecutive members sharing a key (``KEY.jpg``, ``KEY.txt``, ...), with
webdataset's naming rules (``base_plus_ext``, ``__meta__`` members skipped, suffixes
lower-cased). Every such run is a sample, with or without an image: the loader decides what is
bad. This is written on :mod:`tarfile` rather than on webdataset's stream reader because the
loader plans batches from header counts, so a damaged shard must stream exactly the samples
its header scan counted. webdataset's reader ends a truncated shard at another point than a
header scan does (on a test shard, at 431 of 831 cut points), and merges the partial sample
into the next shard's first. Here both use :func:`_scan`:

* a shard is whole only when its end-of-archive blocks (two zero blocks) follow its last
  member; a shard cut short, inside a member's data or on a header or member boundary,
  streams its last sample as bad (``truncated_shard``): once per shard, with the shard
  named, and that sample may have lost members. Samples after the cut have no headers
  left, so they are neither counted nor streamed;
* a shard that cannot be opened at all counts, and streams, as one bad sample named after it;
* a key that comes back later in the same shard (its members not consecutive) is a second
  sample with the first one's name: it is streamed as bad (``malformed_row``), so two
  samples are never mistaken for one.

Hostile or odd shards cost no more memory than their largest allowed member, whatever their
headers claim:

* a member is read only when its header's size is within its limit (:data:`MEMBER_LIMITS`:
  1 MiB for ``.txt``, ``.caption`` and ``.json``, 64 MiB for an image or any other member);
  a larger one makes its sample bad (``member_too_large``) and is skipped unread. A sparse
  member (GNU sparse: little data that expands to its stated size) is refused unread too
  (``malformed_row``): no writer of image-text shards makes them;
* no single read from a shard is larger than the largest limit, so tar's own extended
  headers (pax records, GNU long names), which :mod:`tarfile` reads whole, are bounded too;
  a larger one ends the shard where it stands, as a damaged header does;
* a shard is read as plain tar unless its name declares compression (``.tar.gz``/``.tgz``,
  ``.tar.bz2``/``.tbz2``, ``.tar.xz``/``.txz``): a compressed stream named ``.tar`` is not
  unpacked but counts, and streams, as one bad sample named after the shard
  (``compressed_shard``).

Remote shards (``remote.py``: URLs, ``pipe:`` commands) are streams: their bytes come once,
in order. The same :func:`_scan` reads them, on a file that turns tarfile's seeks into reads
(:class:`_Forward`: forward seeks read past data in pieces, backward ones reach only the last
few blocks, where the end-of-archive and compression checks look), and a sample's members
are read as their headers come (:func:`read_samples` always does so, local files too: the
same bytes, in file order). So every rule above holds for streams, by the same code: the
size limits before any read, sparse members refused, a key that comes back later, a stream
cut mid-shard (a server that closes the connection early) streams its last sample as
``truncated_shard``, once, named with the URL and why the transfer broke off. A remote
shard of which nothing arrives, after the transport's retries, is one bad sample
(``unreachable_shard``), as an unopenable local shard is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from webdataset.tariterators import base_plus_ext

from threetowers.data.sources import remote
from threetowers.data.sources.bad_samples import BadSample

# What tarfile and the decompressors raise on damaged archives.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
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
# Metadata members, skipped: the same rule as webdataset's tar reader.
_META = re.compile(r"__[^/]*__($|/)")


@dataclass
class _Group:
    key: str
    members: list[tarfile.TarInfo] = field(default_factory=list)
    sample: dict[str, Any] | None = None  # what read_samples made of its members so far


def _scan(
    archive: tarfile.TarFile, take: Callable[[_Group, tarfile.TarInfo], None] | None = None
) -> Iterator[_Group]:
    """Samples of an open archive from its headers; stops quietly where they break off.
    ``take(group, member)`` is called on each member as its header is read, before the next
    one: the only moment a stream still holds its data."""
    group = None
    while True:
        try:
            member = archive.next()
        except _TAR_ERRORS:
            member = None  # a damaged header ends the shard; data checks flag what it cut
        if member is None:
            break
        archive.members.clear()  # tarfile keeps every header otherwise: memory grows per shard
        name = member.name
        if not member.isreg() or _META.match(name):
            continue
        key, _ = base_plus_ext(name)
        if key is None:
            continue
        if group is None or key != group.key:
            if group is not None:
                yield group
            group = _Group(key)
        group.members.append(member)
        if take is not None:
            take(group, member)
    if group is not None:
        yield group


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

    def __init__(self, file: IO[bytes], stream: remote.RemoteStream) -> None:
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


def _open(path: str | Path, stream: remote.RemoteStream | None = None) -> tarfile.TarFile:
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
    except _TAR_ERRORS as error:
        raise BadSample("truncated_shard", f"{url} is not a readable tar file ({error})") from None
    return _open_file(url, file, opener, None)


def _open_file(
    url: str, file: IO[bytes], opener: Callable, stream: remote.RemoteStream | None
) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=_Capped(file), mode="r:")
    except _TAR_ERRORS as error:
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


def count_samples(path: str | Path) -> int:
    """Samples in one shard from its headers (a shard that cannot be opened counts as 1);
    a remote shard is streamed through (:func:`count_stream`)."""
    if remote.is_remote(path):
        return count_stream(str(path)).samples
    try:
        archive = _open(path)
    except BadSample:
        return 1
    with archive, closing(archive.fileobj):
        return sum(1 for _ in _scan(archive))


@dataclass(frozen=True)
class StreamCount:
    """A remote shard's count: ``failure`` says why its transfer broke off where that
    decided the count (None: the count is the data's own, and can be kept); ``unreachable``:
    nothing arrived at all."""

    samples: int
    failure: str | None = None
    unreachable: bool = False


def count_stream(url: str) -> StreamCount:
    """Samples in a remote shard: its headers, read as they stream past (the data between
    them read and dropped), by the same scan that :func:`read_samples` streams it with."""
    stream = remote.open_stream(url)
    try:
        archive = _open(url, stream)
    except BadSample:
        stream.close()
        return StreamCount(1, stream.failure, stream.failure is not None and not stream.received)
    with archive, closing(archive.fileobj):
        samples = sum(1 for _ in _scan(archive))
        return StreamCount(samples, None if _ends_whole(archive) else stream.failure)


def read_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of one shard in file order, as webdataset-style dicts (``__key__``,
    ``__url__``, and the member bytes by suffix); a sample that cannot be read carries
    ``__bad__`` = (reason, detail) instead of its members. A remote shard (a ``str`` URL or
    ``pipe:`` command, see ``remote.py``) is streamed."""
    url = str(path)
    stream = remote.open_stream(url) if remote.is_remote(path) else None
    try:
        archive = _open(path, stream)
    except BadSample as bad:
        key = Path(path).name if stream is None else remote.shard_name(url)
        yield _bad(key, url, bad.reason, bad.detail)
        return
    with archive, closing(archive.fileobj):
        seen: set[str] = set()

        def take(group: _Group, member: tarfile.TarInfo) -> None:
            if group.sample is None:  # its first member: a key seen before is malformed
                fresh = {"__key__": group.key, "__url__": url}
                group.sample = _malformed(group, url) if group.key in seen else fresh
                seen.add(group.key)
            if "__bad__" not in group.sample:
                group.sample = _add_member(archive, member, group.sample, url)

        last = None  # held back one sample: only the end of the scan tells if it is whole
        for group in _scan(archive, take):
            if last is not None:
                yield last
            last = group.sample
        cut = last is not None and not _ends_whole(archive)
        if cut and last.get("__bad__", ("",))[0] != "truncated_shard":  # once per shard
            failure = None if stream is None else stream.failure
            why = (
                "the file was cut short (an interrupted download or copy?)"
                if failure is None
                else f"the transfer broke off ({failure})"
            )
            detail = (
                f"{url} stops after sample {last['__key__']!r} without the tar end-of-archive "
                f"blocks: {why}, so this sample may have lost members and later samples are "
                "missing"
            )
            last = _bad(last["__key__"], url, "truncated_shard", detail)
        if last is not None:
            yield last


def _ends_whole(archive: tarfile.TarFile) -> bool:
    """Whether two zero blocks, the end-of-archive marker, follow the last member read.
    ``archive.offset`` is where tarfile stopped reading headers: the end of the last member
    (tarfile itself stops at the first zero block, or quietly at a cut)."""
    marker = 2 * tarfile.BLOCKSIZE
    try:
        archive.fileobj.seek(archive.offset)
        return archive.fileobj.read(marker) == bytes(marker)
    except _TAR_ERRORS:
        return False


def _bad(key: str, url: str, reason: str, detail: str) -> dict[str, Any]:
    return {"__key__": key, "__url__": url, "__bad__": (reason, detail)}


def _malformed(group: _Group, url: str) -> dict[str, Any]:
    detail = (
        f"key {group.key!r} comes back later in {url} (its members are not consecutive, so "
        "they cannot be told to belong to one sample); the first sample with it is kept"
    )
    return _bad(group.key, url, "malformed_row", detail)


def _add_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, sample: dict[str, Any], url: str
) -> dict[str, Any]:
    """``sample`` with the data of its next ``member``, or the bad sample it makes: members
    are checked in order, and the first one that fails decides (later ones are not read)."""
    key = sample["__key__"]
    where = f"sample {key!r} of {url}"
    suffix = base_plus_ext(member.name)[1].lower()
    if suffix in sample:
        return _bad(key, url, "malformed_row", f"{where}: two members named {member.name}")
    if member.issparse():
        detail = f"{where}: {member.name} is a sparse member (no shard writer makes them)"
        return _bad(key, url, "malformed_row", detail)
    limit = MEMBER_LIMITS.get(suffix, IMAGE_LIMIT)
    if member.size > limit:
        detail = f"{where}: {member.name} is {member.size:,} bytes (limit {limit:,})"
        return _bad(key, url, "member_too_large", detail)
    try:
        data = archive.extractfile(member).read()
    except _TAR_ERRORS as error:
        data, problem = b"", error
    else:
        problem = "short read"
    if len(data) != member.size:
        broke = getattr(archive.fileobj, "failure", None)  # a stream's (see _Forward)
        problem = problem if broke is None else f"{problem}; the transfer broke off: {broke}"
        detail = f"{where}: the shard ends inside {member.name} ({problem})"
        return _bad(key, url, "truncated_shard", detail)
    sample[suffix] = data
    return sample
