"""Shards that are not local files: ``http(s)://`` URLs, ``pipe:COMMAND`` and any fsspec URL
(``s3://``, ``gs://``, ...), each read as one stream, front to back, never downloaded whole
and never seeked (``tar_samples`` reads a stream's members as they come).

This module says which shards are remote, of which kind, what their names declare, and
whether this machine can read them. The rest of their handling has a module each:

* ``remote_stream``: the transports (curl, webdataset's ``gopen``, fsspec) and their
  retries, resuming where a transfer broke off;
* ``remote_identity``: what the count cache and the feature caches key a shard by (URL,
  ETag, size, time; a command alone);
* ``remote_counts``: a shard's sample count from img2dataset's ``_stats.json``, or a
  streamed count kept in the count cache.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

from threetowers.errors import MissingExtraError, UserError

PARALLEL = 8  # shards asked at once (HEAD requests, counts)
# The names a tar shard may have (tar_samples reads compression from the name only).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_T = TypeVar("_T")


def is_remote(shard: object) -> bool:
    """Whether a shard as the source spells it is read through a transport: a ``str``
    ``pipe:COMMAND`` or ``SCHEME://...`` (a :class:`~pathlib.Path` is always a local file)."""
    return isinstance(shard, str) and (shard.startswith("pipe:") or bool(_URL.match(shard)))


def scheme(url: str) -> str:
    """``pipe``, ``http`` (http and https) or the fsspec protocol of a remote shard."""
    if url.startswith("pipe:"):
        return "pipe"
    protocol = url.split("://", 1)[0].lower()
    return "http" if protocol in ("http", "https") else protocol


def tar_name(url: str) -> str:
    """The name that says what a remote shard is (tar, its compression, parquet): a URL's
    path; for a command, its last word that names a tar (``cat /d/x.tar.gz``,
    ``aws s3 cp s3://b/x.tar -``), else the command itself."""
    if scheme(url) != "pipe":
        return urlsplit(url).path
    try:
        words = shlex.split(url[5:])
    except ValueError:
        words = url[5:].split()
    named = [word for word in words if word.lower().endswith(TAR_SUFFIXES)]
    return named[-1] if named else url


def shard_name(url: str) -> str:
    """The last part of :func:`tar_name` (the key of the one bad sample of an unreadable shard)."""
    return tar_name(url).rstrip("/").rsplit("/", 1)[-1] or url


def names_tar(url: str) -> bool:
    """Whether a remote shard is a tar: any command (its output is a tar by convention), a
    URL whose path ends as a tar shard's name."""
    return scheme(url) == "pipe" or tar_name(url).lower().endswith(TAR_SUFFIXES)


def check_readable(urls: Sequence[str]) -> None:
    """One clear error, before any read, when a kind of remote shard cannot be read here:
    curl missing for http(s), fsspec (or the protocol's own package) missing for others."""
    for kind in sorted({scheme(url) for url in urls}):
        example = next(url for url in urls if scheme(url) == kind)
        if kind == "pipe":
            continue
        if kind == "http":
            if shutil.which("curl") is None:
                raise FileNotFoundError(
                    f"reading http(s) shards ({example}) needs curl on the PATH; install curl"
                )
            continue
        try:
            import fsspec
        except ImportError:
            raise MissingExtraError(
                f"reading {kind}:// shards ({example}) needs fsspec: pip install "
                f"'threetowers[remote]' (and the protocol's own package, e.g. s3fs for s3://, "
                f"gcsfs for gs://)"
            ) from None
        try:
            fsspec.get_filesystem_class(kind)
        except ImportError as error:
            raise MissingExtraError(
                f"fsspec cannot read {kind}:// shards ({example}) here: {error}"
            ) from None
        except ValueError as error:
            raise UserError(f"cannot read shard {example}: {error}") from None


def parallel(function: Callable[[str], _T], urls: Sequence[str]) -> list[_T]:
    """``function`` of each URL in order, :data:`PARALLEL` at a time (each waits on a server)."""
    if len(urls) <= 1:
        return [function(url) for url in urls]
    with ThreadPoolExecutor(min(PARALLEL, len(urls))) as pool:
        return list(pool.map(function, urls))
