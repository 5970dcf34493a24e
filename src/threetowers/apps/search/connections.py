"""``threetowers serve``'s connections, bounded against slow and numerous clients
(:func:`server_config`, :class:`Connection`): a request's line and headers must arrive
within ``request_timeout`` seconds and its body may not stall for longer; an idle connection
closes after ``idle_timeout``; a request head larger than ``max_head_bytes`` is answered 414
or 431, a malformed one 400 (JSON, like every other error). At most ``max_connections`` are
held open: a new one beyond them closes the connection that has waited longest for its
request (a slow client loses to a new one), or, when every connection is busy with a
request, is answered 503 (the one error that is not a 4xx). Below the file-descriptor limit
there is always room to accept (and drop) a connection: accept() failing for want of one
left the server silent while asyncio logged "Too many open files" thousands of times a
second. That log line, should anything else bring it, passes once a minute.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from threetowers.errors import UserError

log = logging.getLogger(__name__)
BACKLOG = 16  # connections the kernel queues; also the most asyncio accepts in one loop turn
FD_RESERVE = 32  # descriptors for what the server opens while it serves (files, threads)
ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's log line for EMFILE
LINGER_SECONDS = 2.0  # how long a refused request's leftovers are read and dropped


def server_config(
    app, host: str, port: int, limits, headers: dict[str, str], log_level: str = "warning"
) -> uvicorn.Config:
    """The uvicorn configuration ``serve`` runs ``app`` with: HTTP/1.1 by :class:`Connection`
    under ``limits`` (the server's ``Limits``), on the asyncio loop (whose accept loop the
    bounds are measured for); ``headers`` go on every error the connection answers itself."""
    bounds = Bounds.for_open_files(limits, headers)
    if bounds.max_open < limits.max_connections:
        log.warning(
            "ulimit -n leaves room for %d connections at once, not %d",
            bounds.max_open,
            limits.max_connections,
        )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=functools.partial(Connection, bounds=bounds),
        loop="asyncio",
        backlog=BACKLOG,
        timeout_keep_alive=limits.idle_timeout,
        h11_max_incomplete_event_size=limits.max_head_bytes,
        log_level=log_level,
    )


@dataclass
class Bounds:
    """One server's connection bounds, and the connections waiting for a request head
    (oldest first)."""

    limits: Any  # the server's Limits: max_head_bytes, the timeouts, max_connections
    headers: dict[str, str]  # on the errors a connection answers itself
    max_open: int  # beyond: the connection waiting longest goes, or the new one gets 503
    ceiling: int  # beyond: a new connection is dropped unanswered (descriptors run short)
    waiting: dict[Connection, None] = field(default_factory=dict)

    @classmethod
    def for_open_files(cls, limits, headers: dict[str, str]) -> Bounds:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = 2**20 if soft == resource.RLIM_INFINITY else soft
        # asyncio accepts up to BACKLOG connections a loop turn, and one closed as it arrives
        # frees its descriptor a few turns later: room for four turns of them stays free.
        ceiling = soft - len(os.listdir("/dev/fd")) - FD_RESERVE - 4 * BACKLOG
        if ceiling < 1:
            raise UserError(
                f"ulimit -n is {soft}: too few open files for a server; raise it (ulimit -n 1024)"
            )
        return cls(limits, headers, min(limits.max_connections, ceiling), ceiling)


class Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection, bounded against slow, malformed and numerous clients
    (see the module's docstring). uvicorn has no timeout for a request head, and a
    connection that has sent nothing yet has no timer at all; here one deadline runs from
    the connection's start (or its previous response) until its request head is in, and
    again from each piece of a body until the next."""

    def __init__(self, bounds: Bounds, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bounds = bounds
        self.deadline: asyncio.TimerHandle | None = None
        self.lingering = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._wait_for_request()
        if len(self.connections) <= self.bounds.max_open:
            return
        oldest = next(iter(self.bounds.waiting))
        if oldest is not self:
            del self.bounds.waiting[oldest]
            oldest.transport.close()
        elif len(self.connections) > self.bounds.ceiling:
            transport.abort()
        else:
            self.app = functools.partial(_busy, self.bounds.headers)  # all are mid-request

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # what follows a refused request: read and dropped
        super().data_received(data)
        state = self.conn.their_state
        if self.lingering or self.transport.is_closing() or state is h11.IDLE:
            return
        self.bounds.waiting.pop(self, None)
        if state is h11.SEND_BODY:
            self._arm()
        else:
            self._disarm()  # the request is in: the rest is the server's time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait_for_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bounds.waiting.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: uvicorn's plain-text 400 becomes the JSON error, 414 or
        431 for a head past ``max_head_bytes``."""
        limit = self.bounds.limits.max_head_bytes
        head = self.conn.trailing_data[0]  # h11 keeps an incomplete head it refused
        if len(head) <= limit:
            self._refuse(400, "not an HTTP/1.1 request")
        elif b"\n" not in head[:limit]:
            self._refuse(414, f"the request line is longer than {limit} bytes")
        else:
            self._refuse(431, f"the request's headers are longer than {limit} bytes")

    def _wait_for_request(self) -> None:
        self.bounds.waiting.pop(self, None)
        self.bounds.waiting[self] = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        timeout = self.bounds.limits.request_timeout
        self.deadline = self.loop.call_later(timeout, self._timed_out)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _timed_out(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server stopped reading, not the client sending
            self._arm()
        elif self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            timeout = self.bounds.limits.request_timeout
            self._refuse(408, f"the request did not arrive within {timeout:g} s")
        else:  # nothing sent, or a body stalled: the app, if any, sees a disconnect
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with the JSON error and close, whatever state h11 is in."""
        body = json.dumps({"error": message}).encode()
        headers = {
            "content-type": "application/json",
            "content-length": str(len(body)),
            "connection": "close",
        } | self.bounds.headers
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        # Closed with input unread, the socket would be reset, and a reset can discard the
        # answer before the client reads it (RFC 9112 §9.6): send it and end our side, drop
        # what still arrives until the client closes or LINGER_SECONDS pass.
        self.lingering = True
        self.bounds.waiting.pop(self, None)
        self._unset_keepalive_if_required()
        self._disarm()
        self.transport.write_eof()
        self.deadline = self.loop.call_later(LINGER_SECONDS, self.transport.close)


async def _busy(headers: dict[str, str], scope, receive, send) -> None:
    message = "the server is busy with other requests; try again in a moment"
    extra = {"Connection": "close", "Retry-After": "1"}
    response = JSONResponse({"error": message}, status_code=503, headers=headers | extra)
    await response(scope, receive, send)


class OnceEvery(logging.Filter):
    """Lets one record that starts with ``prefix`` through per ``seconds`` (with the number
    held back since), and every other record."""

    def __init__(self, prefix: str, seconds: float, clock=time.monotonic) -> None:
        super().__init__()
        self.prefix, self.seconds, self.clock = prefix, seconds, clock
        self.next_at, self.held = -math.inf, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        now = self.clock()
        if now < self.next_at:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg}\n({self.held} more since the last one, not logged)"
            self.held = 0
        self.next_at = now + self.seconds
        return True


def quiet_accept_errors(seconds: float = 60.0) -> None:
    """asyncio logs each failed accept() (with its traceback) on every retry; once a minute
    says as much."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, OnceEvery) for f in logger.filters):
        logger.addFilter(OnceEvery(ACCEPT_ERROR, seconds))
