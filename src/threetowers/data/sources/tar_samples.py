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
headers claim (``tar_archive``: reads capped, compression only as the name declares it):

* a member is read only when its header's size is within its limit (``MEMBER_LIMITS``:
  1 MiB for ``.txt``, ``.caption`` and ``.json``, 64 MiB for an image or any other member);
  a larger one makes its sample bad (``member_too_large``) and is skipped unread. A sparse
  member (GNU sparse: little data that expands to its stated size) is refused unread too
  (``malformed_row``): no writer of image-text shards makes them.

Remote shards (``remote.py``: URLs, ``pipe:`` commands) are streams: their bytes come once,
in order. The same :func:`_scan` reads them (``tar_archive`` opens them as forward-only
files), and a sample's members are read as their headers come (:func:`read_samples` always
does so, local files too: the same bytes, in file order). So every rule above holds for
streams, by the same code: the size limits before any read, sparse members refused, a key
that comes back later, a stream cut mid-shard (a server that closes the connection early)
streams its last sample as ``truncated_shard``, once, named with the URL and why the
transfer broke off.

A reader that needs only some members (a tokenizer's pass needs the captions:
``shards.caption_members``) names them: the others are checked from their headers as
before (size limit, sparse, a suffix twice), so the same samples are bad, but their data is
not read: a local file seeks over it; a stream, which cannot skip, reads it and drops it.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Collection, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from threetowers.data.sources import remote, remote_stream
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.tar_archive import (
    IMAGE_LIMIT,
    MEMBER_LIMITS,
    TAR_ERRORS,
    ends_whole,
    open_archive,
)

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
        except TAR_ERRORS:
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


def count_samples(path: str | Path) -> int:
    """Samples in one shard from its headers (a shard that cannot be opened counts as 1);
    a remote shard is streamed through (:func:`count_stream`)."""
    counted = count_stream(str(path)) if remote.is_remote(path) else count_file(path)
    return counted.samples


@dataclass(frozen=True)
class ShardCount:
    """A shard's count: ``failure`` says why the shard broke off (or could not be opened, or
    its transfer broke off) where that decided the count (None: the count is the data's
    own, and can be kept); ``unreachable``: of a stream, nothing arrived at all."""

    samples: int
    failure: str | None = None
    unreachable: bool = False


def count_file(path: str | Path) -> ShardCount:
    """Samples in a local shard from its headers; one that cannot be opened counts as 1 (it
    streams as one bad sample)."""
    try:
        archive = open_archive(path)
    except BadSample as bad:
        return ShardCount(1, bad.detail)
    with archive, closing(archive.fileobj):
        samples = sum(1 for _ in _scan(archive))
        whole = ends_whole(archive)
    return ShardCount(samples, None if whole else "no end-of-archive blocks after its last member")


def count_stream(url: str) -> ShardCount:
    """Samples in a remote shard: its headers, read as they stream past (the data between
    them read and dropped), by the same scan that :func:`read_samples` streams it with."""
    stream = remote_stream.open_stream(url)
    try:
        archive = open_archive(url, stream)
    except BadSample:
        stream.close()
        return ShardCount(1, stream.failure, stream.failure is not None and not stream.received)
    with archive, closing(archive.fileobj):
        samples = sum(1 for _ in _scan(archive))
        return ShardCount(samples, None if ends_whole(archive) else stream.failure)


def read_samples(
    path: str | Path, members: Collection[str] | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of one shard in file order, as webdataset-style dicts (``__key__``,
    ``__url__``, and the member bytes by suffix); a sample that cannot be read carries
    ``__bad__`` = (reason, detail) instead of its members. A remote shard (a ``str`` URL or
    ``pipe:`` command, see ``remote.py``) is streamed. ``members``: the suffixes whose data
    is read (None: all); any other member is checked from its header only and stands in
    its sample as None."""
    url = str(path)
    stream = remote_stream.open_stream(url) if remote.is_remote(path) else None
    try:
        archive = open_archive(path, stream)
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
                group.sample = _add_member(archive, member, group.sample, url, members)

        last = None  # held back one sample: only the end of the scan tells if it is whole
        for group in _scan(archive, take):
            if last is not None:
                yield last
            last = group.sample
        cut = last is not None and not ends_whole(archive)
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


def _bad(key: str, url: str, reason: str, detail: str) -> dict[str, Any]:
    return {"__key__": key, "__url__": url, "__bad__": (reason, detail)}


def _malformed(group: _Group, url: str) -> dict[str, Any]:
    detail = (
        f"key {group.key!r} comes back later in {url} (its members are not consecutive, so "
        "they cannot be told to belong to one sample); the first sample with it is kept"
    )
    return _bad(group.key, url, "malformed_row", detail)


def _add_member(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    sample: dict[str, Any],
    url: str,
    wanted: Collection[str] | None,
) -> dict[str, Any]:
    """``sample`` with the data of its next ``member`` (None when its suffix is not
    ``wanted``), or the bad sample it makes: members are checked in order, and the first one
    that fails decides (later ones are not read)."""
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
    if wanted is not None and suffix not in wanted:
        sample[suffix] = None  # tarfile's next header read seeks over its data
        return sample
    try:
        data = archive.extractfile(member).read()
    except TAR_ERRORS as error:
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
