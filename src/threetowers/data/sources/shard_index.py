"""Local tar shards' sample counts kept beside the feature caches (``data.cache_dir``), so that
a dataset's tar headers are scanned once, not by every process that opens it (each torchrun
rank, ``cache``, every start).

One index file per folder of shards, ``CACHE_DIR/shard_counts-HASH.json`` (HASH: of the
folder's resolved path, as ``caches/identity.py`` names caches by what they hold), with each
shard's count under its file name beside the size and modification time (ns) it was counted
at: the identity the feature caches key a shard by. A shard whose size or time differs, or
a new one, is scanned again and its entry replaced, so a count is never read stale. Only
counts of shards read whole are kept: a shard cut short, or one that could not be opened,
may owe its count to a passing I/O error, and is scanned again by each process, as without
an index.

The file is written whole or not at all; a writer merges what the file holds when it writes
(two processes indexing one folder at once lose nothing but a rescan) and drops the entries
of shards that are gone. A damaged file is ignored with a warning and written anew; a folder
that cannot be written is passed over with a warning (each process then scans).

Parquet files are not indexed: their count is in their footer, which opening the source reads
anyway (``parquet_samples.check_columns``). Remote shards keep theirs in ``remote_counts``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from threetowers.files.atomic import write_atomic
from threetowers.files.readback import read_json

log = logging.getLogger(__name__)

FORMAT = 1  # of an index file: any other is written anew
ShardKey = tuple[str, int, int]  # a shard's resolved path, size and modification time (ns)


def shard_key(path: str | Path) -> ShardKey:
    """What a local shard's count is kept under: its contents change, it changes."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def index_file(cache_dir: str | Path, shard_folder: str) -> Path:
    """The index file of the shards in ``shard_folder`` (a resolved path)."""
    digest = hashlib.sha256(shard_folder.encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / f"shard_counts-{digest}.json"


def load(cache_dir: str | Path, keys: Iterable[ShardKey]) -> dict[ShardKey, int]:
    """The counts the index holds for shards of these keys (those it lacks, or holds for
    another size or time, are absent)."""
    found = {}
    for folder, names in _by_folder(keys).items():
        entries = _entries(index_file(cache_dir, folder), folder, warn=True)
        for name, key in names.items():
            entry = entries.get(name)
            if entry is not None and (entry["size"], entry["mtime_ns"]) == key[1:]:
                found[key] = entry["samples"]
    return found


def save(cache_dir: str | Path, counts: Mapping[ShardKey, int]) -> None:
    """Add ``counts`` to the index (entries of the same shards replaced)."""
    for folder, names in _by_folder(counts).items():
        path = index_file(cache_dir, folder)
        kept = _entries(path, folder, warn=False)  # load() said if it was damaged
        entries = {n: e for n, e in kept.items() if os.path.exists(os.path.join(folder, n))}
        for name, key in names.items():
            entries[name] = {"size": key[1], "mtime_ns": key[2], "samples": counts[key]}
        record = {"format": FORMAT, "folder": folder, "shards": entries}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(record, sort_keys=True))
        except OSError as error:
            log.warning(
                "cannot keep the sample counts of the shards in %s in %s (%s): each process "
                "scans their tar headers",
                folder,
                path,
                error,
            )


def _by_folder(keys: Iterable[ShardKey]) -> dict[str, dict[str, ShardKey]]:
    """Keys grouped by their shard's folder, each under its shard's file name."""
    grouped: dict[str, dict[str, ShardKey]] = {}
    for key in keys:
        folder, name = os.path.split(key[0])
        grouped.setdefault(folder, {})[name] = key
    return grouped


def _entries(path: Path, folder: str, warn: bool) -> dict[str, dict[str, int]]:
    """The entries of an index file ({} when it is absent, or damaged: said when ``warn``)."""
    try:
        record = read_json(path)
    except (FileNotFoundError, NotADirectoryError):  # none yet (save says if it cannot be)
        return {}
    except (OSError, ValueError) as error:  # DamagedFileError is a ValueError
        return _damaged(path, str(error), warn)
    entries = record.get("shards")
    if record.get("format") != FORMAT or record.get("folder") != folder:
        return _damaged(path, f"not an index of format {FORMAT} for {folder}", warn)
    if not isinstance(entries, dict) or not all(map(_is_entry, entries.values())):
        return _damaged(path, "its entries are not {size, mtime_ns, samples} numbers", warn)
    return entries


def _is_entry(entry) -> bool:
    fields = ("size", "mtime_ns", "samples")
    return isinstance(entry, dict) and all(type(entry.get(f)) is int for f in fields)


def _damaged(path: Path, why: str, warn: bool) -> dict:
    if warn:
        log.warning(
            "shard index %s is unusable (%s): its shards' tar headers are scanned again and "
            "it is written anew",
            path,
            why,
        )
    return {}
