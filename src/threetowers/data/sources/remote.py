"""Shards that are not local files: ``http(s)://`` URLs, ``pipe:COMMAND`` and any fsspec URL
(``s3://``, ``gs://``, ...), each read as one stream, front to back, never downloaded whole
and never seeked (``tar_samples`` reads a stream's members as they come).

Transports
    * ``http://``, ``https://``: curl, run through webdataset's ``Pipe`` as
      ``gopen_curl`` runs it but with its own arguments: gopen's ``--retry 30 --retry-delay 2``
      would spend a minute inside curl on a dead shard, out of reach of the retries below.
    * ``pipe:COMMAND``: webdataset's ``gopen``: a shell command that writes the tar to its
      stdout (``pipe:aws s3 cp s3://bucket/x.tar -``), as webdataset spells it.
    * any other ``SCHEME://``: fsspec (``pip install 'threetowers[remote]'``, and the
      protocol's own package: ``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``). Without it,
      opening the source says which extra to install.

Failures. A transport that fails (curl's or the command's non-zero exit: connection refused,
HTTP 5xx, a connection closed early; an fsspec error) is opened again after
:data:`FIRST_DELAY` seconds, then twice that, ..., :data:`TRIES` tries in all, and the bytes
already received are read again and skipped (every transport alike: no Range request that
a server may ignore), so the stream goes on where it broke off. A permanent failure
(HTTP 4xx other than 408 and 429, a file fsspec does not find) is not tried again. After the
last try the stream ends where it stands and :attr:`RemoteStream.failure` says why;
``tar_samples`` then streams the shard as one bad sample (``unreachable_shard``) when
nothing came, else its last sample as ``truncated_shard``, named with the URL. A process is
read to its end before its exit status is judged, so a connection closed early always
yields the same bytes: the count of a shard and its stream agree (a reader that stopped at
curl's exit would lose what the pipe still held, at a point that depends on timing).

Identity (:func:`identity`: what the count cache and the feature caches key a shard by):
the URL with the ``ETag``, size and ``Last-Modified`` that a HEAD request returns (fsspec:
its ``info``); the URL alone when the server refuses HEAD for good (a URL signed for GET
only), and ``None`` when it cannot be asked now. A ``pipe:`` command has no such thing: it
is keyed by the command alone. So when the data behind a command changes, the count kept
for it is stale: the stream no longer holds the samples its epoch was planned with, and is
fitted to the plan (``shards.py``: samples missing stream as bad, samples beyond the count
are left out, named), or, where the plan is not known (a loader worker started by spawn
or forkserver rather than fork), the loader's count check stops the epoch with its
message. Delete the count cache (:func:`count_cache_dir`) after changing the data behind a
command.

Counts (the loader plans from them before an epoch, see ``shards.count_shard_samples``):
img2dataset's ``_stats.json`` beside the shard (``00000.tar`` -> ``00000_stats.json``, its
``successes``: one small read, :func:`stats_count`), else a streamed count kept in
:func:`count_cache_dir` (one small JSON file per shard identity, :func:`load_count`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from webdataset.gopen import Pipe, gopen, set_options

from threetowers.files.atomic import write_atomic

log = logging.getLogger(__name__)

TRIES = 3  # tries of one transport (open or read), the first included
FIRST_DELAY = 0.5  # seconds before the second try; each later one waits twice as long
CONNECT_TIMEOUT = 30  # seconds for curl to connect
STALL_SECONDS = 60  # the longest a HEAD request or a _stats.json read may take
PARALLEL = 8  # shards asked at once (HEAD requests, counts)
STATS_LIMIT = 1 << 20  # bytes of a _stats.json read at most
_SKIP_CHUNK = 1 << 20
# The names a tar shard may have (tar_samples reads compression from the name only).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_HTTP_STATUS = re.compile(r"error: (\d{3})")
_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 414, 451}  # asking again cannot help
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
            raise ImportError(
                f"reading {kind}:// shards ({example}) needs fsspec: pip install "
                f"'threetowers[remote]' (and the protocol's own package, e.g. s3fs for s3://, "
                f"gcsfs for gs://)"
            ) from None
        try:
            fsspec.get_filesystem_class(kind)
        except ImportError as error:
            raise ImportError(
                f"fsspec cannot read {kind}:// shards ({example}) here: {error}"
            ) from None
        except ValueError as error:
            raise ValueError(f"cannot read shard {example}: {error}") from None


# --------------------------------------------------------------------------- transports


class _Failure(Exception):
    """A transport failed; ``permanent``: trying again cannot help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _Transport(Protocol):
    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes, ``b""`` at the end; :class:`_Failure` when reading fails."""

    def finish(self) -> _Failure | None:
        """After the end: whether the transfer failed (closes the transport)."""

    def close(self) -> None: ...


class _Piped:
    """A process that writes the shard to its stdout (curl, a ``pipe:`` command), through
    webdataset's ``Pipe``: read to its end, then its exit status judged."""

    def __init__(self, pipe: Pipe, what: str) -> None:
        set_options(pipe, ignore_errors=True)  # judged at the end, in finish()
        self.pipe, self.what = pipe, what
        self.stderr = pipe.proc.stderr  # curl's one line of error, captured; a command's not

    def read(self, size: int) -> bytes:
        return self.pipe.read(size)

    def finish(self) -> _Failure | None:
        status = self.pipe.proc.wait()
        said = self.stderr.read().decode("utf-8", "replace").strip() if self.stderr else ""
        self.close()
        if status == 0:
            return None
        return _said(said, f"{self.what} exited with status {status}")

    def close(self) -> None:
        if self.pipe.proc.poll() is None:  # closed before its end: its output is not wanted
            self.pipe.proc.terminate()
        self.pipe.close()
        if self.stderr is not None:
            self.stderr.close()


def _said(said: str, otherwise: str) -> _Failure:
    """curl's failure from its error line; an HTTP status that asking again cannot change
    (404, 403, ...) is permanent."""
    code = _HTTP_STATUS.search(said)
    permanent = code is not None and int(code[1]) in _PERMANENT_HTTP
    return _Failure(said.splitlines()[-1] if said else otherwise, permanent)


def _run_curl(args: list[str]) -> bytes:
    """A short curl request's output; :class:`_Failure` when it fails."""
    try:
        done = subprocess.run(args, capture_output=True, timeout=STALL_SECONDS + 10)
    except subprocess.TimeoutExpired:
        raise _Failure(f"no answer in {STALL_SECONDS + 10} s") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip()
        raise _said(said, f"curl exited with status {done.returncode}")
    return done.stdout


def _curl(url: str) -> _Piped:
    # No transfer-speed limit: a loader worker that waits on its full queue keeps curl's
    # stdout full, which curl would take for a stalled server (TCP keepalive, curl's
    # default, still ends a connection whose server has gone).
    args = ["curl", "-sS", "-f", "-L", "--connect-timeout", str(CONNECT_TIMEOUT), url]
    pipe = Pipe(args, mode="rb", bufsize=1 << 16, stderr=subprocess.PIPE)
    return _Piped(pipe, "curl")


class _Fsspec:
    """An fsspec file read front to back. Its backends raise their own exception types, so
    any exception is a failure (tried again unless the file is not there)."""

    def __init__(self, url: str) -> None:
        import fsspec

        try:
            self.file = fsspec.open(url, "rb").open()
        except Exception as error:
            raise _fsspec_failure(error) from None

    def read(self, size: int) -> bytes:
        try:
            return self.file.read(size)
        except Exception as error:
            raise _fsspec_failure(error) from None

    def finish(self) -> _Failure | None:
        self.close()
        return None

    def close(self) -> None:
        self.file.close()


def _fsspec_failure(error: Exception) -> _Failure:
    permanent = isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError))
    return _Failure(f"{type(error).__name__}: {error}", permanent)


def _transport(url: str) -> _Transport:
    kind = scheme(url)
    if kind == "pipe":
        return _Piped(gopen(url, "rb", bufsize=1 << 16), "the command")
    if kind == "http":
        return _curl(url)
    return _Fsspec(url)


def _retrying(
    url: str, attempt: Callable[[], _T], done: int = 0
) -> tuple[_T | None, _Failure | None]:
    """``attempt()`` until it succeeds or :data:`TRIES` (``done`` of them spent) are spent,
    waiting :data:`FIRST_DELAY`, then twice as long, ... between tries: (its result, None),
    or (None, the last failure, its message saying how many tries were made)."""
    tries = done
    while True:
        tries += 1
        try:
            return attempt(), None
        except _Failure as failure:
            if failure.permanent or tries >= TRIES:
                return None, _Failure(_tried(failure, tries), failure.permanent)
            delay = FIRST_DELAY * 2 ** (tries - 1)
            log.info("%s: try %d failed (%s); trying again in %.1f s", url, tries, failure, delay)
            time.sleep(delay)


class RemoteStream:
    """A remote shard's bytes in order, as one file read front to back (``read`` returns
    ``size`` bytes unless the stream ends), tried again from where it broke off when its
    transport fails (see the module docstring). ``failure``: why it ended early, after its
    last try (None: it ended well, or has not ended yet); ``received``: bytes delivered."""

    def __init__(self, url: str) -> None:
        self.url, self.received, self.tries = url, 0, 0
        self.failure: str | None = None
        self._transport: _Transport | None = self._connect()

    def _connect(self) -> _Transport | None:
        def attempt() -> _Transport:
            self.tries += 1
            transport = _transport(self.url)
            try:
                _skip(transport, self.received)  # what an earlier try delivered
            except BaseException:
                transport.close()
                raise
            return transport

        transport, failure = _retrying(self.url, attempt, done=self.tries)
        self.failure = None if failure is None else str(failure)
        return transport

    def read(self, size: int = -1) -> bytes:
        parts = []
        while self._transport is not None and size != 0:
            try:
                data = self._transport.read(size if size > 0 else _SKIP_CHUNK)
            except _Failure as failure:
                data, broke = b"", failure
                self._transport.close()
            else:
                broke = None if data else self._transport.finish()
            if data:
                parts.append(data)
                self.received += len(data)
                size = size - len(data) if size > 0 else size
                continue
            if broke is None:
                self._transport = None  # the end
                break
            if broke.permanent or self.tries >= TRIES:
                self._transport, self.failure = None, _tried(broke, self.tries)
                break
            delay = FIRST_DELAY * 2 ** (self.tries - 1)
            log.info(
                "%s: try %d broke off (%s); again in %.1f s", self.url, self.tries, broke, delay
            )
            time.sleep(delay)
            self._transport = self._connect()
        return b"".join(parts)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _tried(failure: _Failure, tries: int) -> str:
    return f"{failure}" if tries == 1 else f"{failure} ({tries} tries)"


def _skip(transport: _Transport, size: int) -> None:
    """Read past the first ``size`` bytes (those an earlier try delivered)."""
    while size > 0:
        data = transport.read(min(size, _SKIP_CHUNK))
        if not data:
            failure = transport.finish()
            raise failure or _Failure(f"this try ended {size:,} bytes before the last broke off")
        size -= len(data)


def open_stream(url: str) -> RemoteStream:
    """The remote shard ``url`` as a :class:`RemoteStream` (connected, with retries)."""
    return RemoteStream(url)


# --------------------------------------------------------------------------- identity


def identity(url: str) -> dict[str, Any] | None:
    """What a remote shard's contents are known by: its URL (a command for ``pipe:``) and,
    when the server gives them, its ETag, size and modification time; None when it cannot
    be asked (the caches then keep nothing for it)."""
    kind = scheme(url)
    if kind == "pipe":
        return {"url": url}
    if kind == "http":
        headers, failure = _retrying(url, lambda: _head(url))
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
    text = _run_curl(args).decode("latin-1").replace("\r", "")
    blocks = [block for block in text.split("\n\n") if block.strip()]
    headers = {}
    for line in blocks[-1].splitlines()[1:] if blocks else []:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def parallel(function: Callable[[str], _T], urls: Sequence[str]) -> list[_T]:
    """``function`` of each URL in order, :data:`PARALLEL` at a time (each waits on a server)."""
    if len(urls) <= 1:
        return [function(url) for url in urls]
    with ThreadPoolExecutor(min(PARALLEL, len(urls))) as pool:
        return list(pool.map(function, urls))


# --------------------------------------------------------------------------- counts


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
    except _Failure as failure:
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
        return _run_curl(args)
    transport = _Fsspec(url)
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
