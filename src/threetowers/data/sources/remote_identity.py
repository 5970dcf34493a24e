"""What a remote shard's contents are known by: the key of its count in the count cache and
of its units in the feature caches.

The URL with the ``ETag``, size and ``Last-Modified`` that a HEAD request returns (fsspec:
its ``info``); the URL alone when the server refuses HEAD for good (a URL signed for GET
only), and ``None`` when it cannot be asked now. A ``pipe:`` command has no such thing: it
is keyed by the command alone. So when the data behind a command changes, the count kept
for it is stale: the stream no longer holds the samples its epoch was planned with, and is
fitted to the plan (``shards.py``: samples missing stream as bad, samples beyond the count
are left out, named), or, where the plan is not known (a loader worker started by spawn
or forkserver rather than fork), the loader's count check stops the epoch with its
message. Delete the count cache (``remote_counts.count_cache_dir``) after changing the data
behind a command.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from threetowers.data.sources.remote import parallel, scheme
from threetowers.data.sources.remote_stream import (
    CONNECT_TIMEOUT,
    STALL_SECONDS,
    retrying,
    run_curl,
)

log = logging.getLogger(__name__)


def identity(url: str) -> dict[str, Any] | None:
    """What a remote shard's contents are known by: its URL (a command for ``pipe:``) and,
    when the server gives them, its ETag, size and modification time; None when it cannot
    be asked (the caches then keep nothing for it)."""
    kind = scheme(url)
    if kind == "pipe":
        return {"url": url}
    if kind == "http":
        headers, failure = retrying(url, lambda: _head(url))
        if failure is not None:  # refused for good (a server or URL that allows GET only):
            # known by the URL alone, as a command is; else not known this time
            return {"url": url} if failure.permanent else None
        wanted = {"etag": "etag", "content-length": "size", "last-modified": "modified"}
        return {"url": url} | {name: headers[h] for h, name in wanted.items() if h in headers}
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except Exception as error:  # fsspec backends raise their own types
        log.info("%s: no identity (%s: %s)", url, type(error).__name__, error)
        return None
    known = {"url": url, "size": info.get("size")}
    for name in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created"):
        if info.get(name) is not None:
            known[name.lower()] = str(info[name])
    return known


def identities(urls: Sequence[str]) -> list[dict[str, Any] | None]:
    """:func:`identity` of each URL, several asked at once."""
    return parallel(identity, urls)


def identity_line(url: str, known: dict[str, Any] | None) -> str:
    """One line for a digest of files: the identity, or the URL marked unknown."""
    return json.dumps(known if known is not None else {"url": url, "unknown": True}, sort_keys=True)


def _head(url: str) -> dict[str, str]:
    """The headers of the last response to a HEAD request (after redirects)."""
    args = ["curl", "-sS", "-f", "-I", "-L", "--connect-timeout", str(CONNECT_TIMEOUT)]
    args += ["--max-time", str(STALL_SECONDS), url]
    text = run_curl(args).decode("latin-1").replace("\r", "")
    blocks = [block for block in text.split("\n\n") if block.strip()]
    headers = {}
    for line in blocks[-1].splitlines()[1:] if blocks else []:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers
