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
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

# What tarfile and the decompressors raise on damaged archives.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError)
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


def count_samples(path: str | Path) -> int:
    """Samples in one shard from its headers (a shard that cannot be opened counts as 1)."""
    try:
        archive = tarfile.open(path, mode="r:*")
    except _TAR_ERRORS:
        return 1
    with archive:
        return sum(1 for _ in _scan(archive))


def read_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of one shard in file order, as webdataset-style dicts (``__key__``,
    ``__url__``, and the member bytes by suffix); a sample that cannot be read carries
    ``__bad__`` = (reason, detail) instead of its members."""
    url = str(path)
    try:
        archive = tarfile.open(path, mode="r:*")
    except _TAR_ERRORS as error:
        detail = f"{url} is not a readable tar file ({error})"
        yield _bad(Path(path).name, url, "truncated_shard", detail)
        return
    with archive:
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
