"""A remote shard's sample count, which the loader plans an epoch from (see
``shards.count_shard_samples``): img2dataset's ``_stats.json`` beside the shard
(``00000.tar`` -> ``00000_stats.json``, its ``successes``: one small read,
:func:`stats_count`), else a streamed count kept in :func:`count_cache_dir` (one small JSON
file per shard identity, ``remote_identity.identity``: :func:`load_count`, :func:`save_count`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from threetowers.data.sources.remote import TAR_SUFFIXES, scheme
from threetowers.data.sources.remote_stream import (
    CONNECT_TIMEOUT,
    STALL_SECONDS,
    Failure,
    FsspecFile,
    run_curl,
)
from threetowers.files.atomic import write_atomic

log = logging.getLogger(__name__)

STATS_LIMIT = 1 << 20  # bytes of a _stats.json read at most


def stats_url(url: str) -> str | None:
    """img2dataset's ``_stats.json`` beside a shard (``00000.tar`` -> ``00000_stats.json``);
    None for a command, whose output has nothing beside it."""
    if scheme(url) == "pipe":
        return None
    parts = urlsplit(url)
    suffix = next((s for s in TAR_SUFFIXES if parts.path.lower().endswith(s)), None)
    if suffix is None:
        return None
    return urlunsplit(parts._replace(path=parts.path[: -len(suffix)] + "_stats.json"))


def stats_count(url: str) -> int | None:
    """The shard's sample count from img2dataset's ``_stats.json`` (``successes``: the
    samples it wrote), or None when there is none or it does not say."""
    where = stats_url(url)
    if where is None:
        return None
    try:
        data = _read_small(where)
    except Failure as failure:
        log.debug("%s: no _stats.json (%s)", url, failure)
        return None
    try:
        successes = json.loads(data)["successes"]
    except (ValueError, KeyError, TypeError):
        return None
    return successes if isinstance(successes, int) and successes >= 0 else None


def _read_small(url: str) -> bytes:
    if scheme(url) == "http":
        args = ["curl", "-sS", "-f", "-L", "--connect-timeout", str(CONNECT_TIMEOUT)]
        args += ["--max-time", str(STALL_SECONDS), "--max-filesize", str(STATS_LIMIT), url]
        return run_curl(args)
    transport = FsspecFile(url)
    try:
        return transport.read(STATS_LIMIT)
    finally:
        transport.close()


def count_cache_dir(folder: str | Path | None = None) -> Path:
    """Where streamed counts of remote shards are kept: ``folder`` when given, else
    ``$THREETOWERS_COUNT_CACHE``, else ``~/.cache/threetowers/shard_counts`` (under
    ``$XDG_CACHE_HOME`` when set)."""
    if folder is not None:
        return Path(folder).expanduser()
    if os.environ.get("THREETOWERS_COUNT_CACHE"):
        return Path(os.environ["THREETOWERS_COUNT_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "threetowers" / "shard_counts"


def _count_file(known: dict[str, Any], folder: str | Path | None) -> Path:
    digest = hashlib.sha256(json.dumps(known, sort_keys=True).encode()).hexdigest()[:32]
    return count_cache_dir(folder) / f"{digest}.json"


def load_count(known: dict[str, Any], folder: str | Path | None = None) -> int | None:
    """The count kept for a shard of this identity, or None (absent, or damaged)."""
    try:
        record = json.loads(_count_file(known, folder).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("identity") != known:
        return None
    samples = record.get("samples")
    return samples if isinstance(samples, int) and samples >= 0 else None


def save_count(known: dict[str, Any], samples: int, folder: str | Path | None = None) -> None:
    """Keep a streamed count (whole or not at all; a folder that cannot be written is passed
    over: the count is streamed again next time)."""
    path = _count_file(known, folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"identity": known, "samples": samples}, sort_keys=True))
    except OSError as error:
        log.warning("cannot keep the sample count of %s in %s (%s)", known["url"], path, error)
