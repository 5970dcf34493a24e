"""What names a cached file: digests of the files and datasets its contents depend on, so
that a changed input never reads a stale cache (a frozen tower's own: its ``digest()``).

A remote shard (``sources/remote_identity.py``) has no stat: it is known by its URL with the ETag,
size and modification time its server gives (a HEAD request, asked each time as a local
file is stat'ed each time), a ``pipe:`` command by the command alone (the cache cannot see
its data change), and one whose server cannot be asked by its URL marked unknown."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from stat import S_ISLNK

from threetowers.data.sources import remote, remote_identity
from threetowers.data.sources.pairs import open_pairs
from threetowers.data.sources.shards import ShardPairs

# Caches keyed by sample: version 2 names shard samples ``SHARD/KEY`` (version 1: ``KEY``,
# which confused samples of shards numbered alike), so no version 1 file is ever reused.
SAMPLE_IDS = 2


def dataset_digest(source) -> str:
    """Identity of a dataset's files (paths, sizes and modification times), of the sample
    ids they give (shard ids hold the shard paths as the source spells them) and of the
    fields read from them (``data.image_key``, ``data.caption_key``)."""
    pairs = open_pairs(source)
    files = pairs.shards if isinstance(pairs, ShardPairs) else [pairs.name]
    fields = pairs.fields.identity()  # {} for the defaults: older caches keep their names
    spelled = json.dumps([SAMPLE_IDS, *map(str, files), *([fields] if fields else [])])
    return hashlib.sha256(f"{files_digest(files)}|{spelled}".encode()).hexdigest()


def files_digest(paths) -> str:
    """Identity of files, in order: resolved paths, sizes and modification times; a file that
    cannot be found counts as missing (it is a bad sample), so its arrival changes it. A
    remote shard counts by its identity (``remote_identity.identity``: URL, ETag, size, time)."""
    digest = hashlib.sha256()
    folders: dict[str, str] = {}  # resolved once each: thousands of images share a few
    paths = list(paths)
    far = [path for path in paths if remote.is_remote(path)]
    known = dict(zip(far, remote_identity.identities(far), strict=True))
    for path in paths:
        if remote.is_remote(path):
            digest.update(f"{remote_identity.identity_line(path, known[path])}\n".encode())
            continue
        folder, name = os.path.split(os.fspath(Path(path)))
        try:
            stat = os.lstat(path)
            if S_ISLNK(stat.st_mode):
                real, stat = Path(path).resolve(), os.stat(path)
            else:
                if folder not in folders:
                    folders[folder] = os.path.realpath(folder)
                real = os.path.join(folders[folder], name)
        except OSError:
            digest.update(f"{Path(path).resolve()}|missing\n".encode())
            continue
        digest.update(f"{real}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def spec_digest(spec: dict) -> str:
    """A digest of ``spec``, the JSON-able description of what a cached file depends on."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def cache_base(cache_dir: str | Path, kind: str, spec: dict) -> Path:
    """``cache_dir/KIND-HASH``: a name that changes with anything in ``spec``."""
    return Path(cache_dir).expanduser() / f"{kind}-{spec_digest(spec)[:24]}"
