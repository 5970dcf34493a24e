"""A remote shard's bytes as one stream (``remote.py`` says which shards are remote), through
its transport, tried again where it breaks off.

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
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from webdataset.gopen import Pipe, gopen, set_options

from threetowers.data.sources.remote import scheme

log = logging.getLogger(__name__)

TRIES = 3  # tries of one transport (open or read), the first included
FIRST_DELAY = 0.5  # seconds before the second try; each later one waits twice as long
CONNECT_TIMEOUT = 30  # seconds for curl to connect
STALL_SECONDS = 60  # the longest a HEAD request or a _stats.json read may take
_SKIP_CHUNK = 1 << 20
_HTTP_STATUS = re.compile(r"error: (\d{3})")
_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 414, 451}  # asking again cannot help
_T = TypeVar("_T")


class Failure(Exception):
    """A transport failed; ``permanent``: trying again cannot help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class _Transport(Protocol):
    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes, ``b""`` at the end; :class:`Failure` when reading fails."""

    def finish(self) -> Failure | None:
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

    def finish(self) -> Failure | None:
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


def _said(said: str, otherwise: str) -> Failure:
    """curl's failure from its error line; an HTTP status that asking again cannot change
    (404, 403, ...) is permanent."""
    code = _HTTP_STATUS.search(said)
    permanent = code is not None and int(code[1]) in _PERMANENT_HTTP
    return Failure(said.splitlines()[-1] if said else otherwise, permanent)


def run_curl(args: list[str]) -> bytes:
    """A short curl request's output; :class:`Failure` when it fails."""
    try:
        done = subprocess.run(args, capture_output=True, timeout=STALL_SECONDS + 10)
    except subprocess.TimeoutExpired:
        raise Failure(f"no answer in {STALL_SECONDS + 10} s") from None
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


class FsspecFile:
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

    def finish(self) -> Failure | None:
        self.close()
        return None

    def close(self) -> None:
        self.file.close()


def _fsspec_failure(error: Exception) -> Failure:
    permanent = isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError))
    return Failure(f"{type(error).__name__}: {error}", permanent)


def _transport(url: str) -> _Transport:
    kind = scheme(url)
    if kind == "pipe":
        return _Piped(gopen(url, "rb", bufsize=1 << 16), "the command")
    if kind == "http":
        return _curl(url)
    return FsspecFile(url)


def retrying(
    url: str, attempt: Callable[[], _T], done: int = 0
) -> tuple[_T | None, Failure | None]:
    """``attempt()`` until it succeeds or :data:`TRIES` (``done`` of them spent) are spent,
    waiting :data:`FIRST_DELAY`, then twice as long, ... between tries: (its result, None),
    or (None, the last failure, its message saying how many tries were made)."""
    tries = done
    while True:
        tries += 1
        try:
            return attempt(), None
        except Failure as failure:
            if failure.permanent or tries >= TRIES:
                return None, Failure(_tried(failure, tries), failure.permanent)
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

        transport, failure = retrying(self.url, attempt, done=self.tries)
        self.failure = None if failure is None else str(failure)
        return transport

    def read(self, size: int = -1) -> bytes:
        parts = []
        while self._transport is not None and size != 0:
            try:
                data = self._transport.read(size if size > 0 else _SKIP_CHUNK)
            except Failure as failure:
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


def _tried(failure: Failure, tries: int) -> str:
    return f"{failure}" if tries == 1 else f"{failure} ({tries} tries)"


def _skip(transport: _Transport, size: int) -> None:
    """Read past the first ``size`` bytes (those an earlier try delivered)."""
    while size > 0:
        data = transport.read(min(size, _SKIP_CHUNK))
        if not data:
            failure = transport.finish()
            raise failure or Failure(f"this try ended {size:,} bytes before the last broke off")
        size -= len(data)


def open_stream(url: str) -> RemoteStream:
    """The remote shard ``url`` as a :class:`RemoteStream` (connected, with retries)."""
    return RemoteStream(url)
