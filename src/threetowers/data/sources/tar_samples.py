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


def _scan(archive: tarfile.TarFile) -> Iterator[_Group]:
    """Samples of an open archive from its headers alone; stops quietly where they break off."""
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


def _open(path: str | Path) -> tarfile.TarFile:
    """The shard as a tar archive, decompressed only as its name says; :class:`BadSample`
    (``truncated_shard``, or ``compressed_shard``) when it cannot be read. Close its
    ``fileobj`` too: tarfile leaves a file it was given open."""
    url = str(path)
    opener = next((o for end, o in _OPENERS.items() if url.endswith(end)), open)
    try:
        file = opener(path, "rb")
    except _TAR_ERRORS as error:
        raise BadSample("truncated_shard", f"{url} is not a readable tar file ({error})") from None
    try:
        return tarfile.open(fileobj=_Capped(file), mode="r:")
    except _TAR_ERRORS as error:
        kind = _compression(file) if opener is open else None
        file.close()
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
    """Samples in one shard from its headers (a shard that cannot be opened counts as 1)."""
    try:
        archive = _open(path)
    except BadSample:
        return 1
    with archive, closing(archive.fileobj):
        return sum(1 for _ in _scan(archive))


def read_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of one shard in file order, as webdataset-style dicts (``__key__``,
    ``__url__``, and the member bytes by suffix); a sample that cannot be read carries
    ``__bad__`` = (reason, detail) instead of its members."""
    url = str(path)
    try:
        archive = _open(path)
    except BadSample as bad:
        yield _bad(Path(path).name, url, bad.reason, bad.detail)
        return
    with archive, closing(archive.fileobj):
        seen: set[str] = set()
        last = None  # held back one sample: only the end of the scan tells if it is whole
        for group in _scan(archive):
            if last is not None:
                yield last
            last = _malformed(group, url) if group.key in seen else _read(archive, group, url)
            seen.add(group.key)
        cut = last is not None and not _ends_whole(archive)
        if cut and last.get("__bad__", ("",))[0] != "truncated_shard":  # once per shard
            detail = (
                f"{url} stops after sample {last['__key__']!r} without the tar end-of-archive "
                "blocks: the file was cut short (an interrupted download or copy?), so this "
                "sample may have lost members and later samples are missing"
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


def _read(archive: tarfile.TarFile, group: _Group, url: str) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": group.key, "__url__": url}
    where = f"sample {group.key!r} of {url}"
    for member in group.members:
        suffix = base_plus_ext(member.name)[1].lower()
        if suffix in sample:
            detail = f"{where}: two members named {member.name}"
            return _bad(group.key, url, "malformed_row", detail)
        if member.issparse():
            detail = f"{where}: {member.name} is a sparse member (no shard writer makes them)"
            return _bad(group.key, url, "malformed_row", detail)
        limit = MEMBER_LIMITS.get(suffix, IMAGE_LIMIT)
        if member.size > limit:
            detail = f"{where}: {member.name} is {member.size:,} bytes (limit {limit:,})"
            return _bad(group.key, url, "member_too_large", detail)
        try:
            data = archive.extractfile(member).read()
        except _TAR_ERRORS as error:
            data, problem = b"", error
        else:
            problem = "short read"
        if len(data) != member.size:
            detail = f"{where}: the shard ends inside {member.name} ({problem})"
            return _bad(group.key, url, "truncated_shard", detail)
        sample[suffix] = data
    return sample
