"""threetowers serve against slow and numerous clients: heads that never finish, idle
connections, more connections than it holds, and a file-descriptor limit it must not hit."""

from __future__ import annotations

import logging
import resource
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.helpers.search_server import running
from threetowers.apps.search.connections import ACCEPT_ERROR, Bounds, OnceEvery
from threetowers.apps.search.engine import QueryEncoder, SearchIndex
from threetowers.apps.search.server import Limits, create_app
from threetowers.errors import UserError

SHORT = Limits(request_timeout=1.0, idle_timeout=1.0, max_connections=4)


@pytest.fixture(scope="module")
def strict(indexed):
    """A server of the test index with short timeouts and room for 4 connections."""
    app = create_app(SearchIndex(indexed.index_dir), QueryEncoder(indexed.run))
    with running(app, SHORT) as url:
        yield url


def connect(url: str, sent: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.settimeout(30)  # far beyond the server's timeouts: a hang fails, not blocks
    connection.sendall(sent)
    return connection


def answer(connection: socket.socket) -> bytes:
    """All the server sends until it closes the connection."""
    received = b""
    try:
        while data := connection.recv(65536):
            received += data
    except ConnectionResetError:  # closed with our bytes unread: dropped, not answered
        pass
    connection.close()
    return received


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connected, nothing sent
        b"GET /api/in",  # half a request line
        b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # half the headers
    ],
)
def test_a_request_that_never_finishes_is_closed(strict, sent):
    slow = connect(strict, sent)
    assert httpx.get(strict + "/api/info").status_code == 200  # others are served meanwhile
    received = answer(slow)  # returns: the server closed it
    if sent:
        assert received.startswith(b"HTTP/1.1 408 ")
        assert b'{"error": "the request did not arrive within 1 s"}' in received
    else:
        assert received == b""


def test_a_refused_request_is_closed_though_its_client_keeps_sending(strict):
    connection = connect(strict, b"NOT HTTP\r\n\r\n")
    received = b""
    while not received.endswith(b"}"):
        received += connection.recv(65536)
    assert received.startswith(b"HTTP/1.1 400 ")
    for _ in range(300):  # dropped unread for LINGER_SECONDS, then the server closes
        try:
            connection.sendall(b"more")
        except (ConnectionResetError, BrokenPipeError):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server kept a refused connection open")
    connection.close()


def test_an_idle_connection_after_a_response_is_closed(strict):
    connection = connect(strict, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    received = answer(connection)  # the response, then the keep-alive connection closes
    assert received.startswith(b"HTTP/1.1 200 ") and received.count(b"HTTP/1.1") == 1


UPLOAD_HEAD = (
    b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
    b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n"
)


def test_a_stalled_upload_is_closed(strict):
    assert answer(connect(strict, UPLOAD_HEAD)) == b""  # closed, the app told of it


def test_more_connections_than_held_still_leave_room_for_a_request(strict):
    with ExitStack() as stack:
        slow = [connect(strict, b"GET /api/in") for _ in range(3 * SHORT.max_connections)]
        for connection in slow:
            stack.callback(connection.close)
        # The slow ones wait for their heads: a new request takes the place of the oldest.
        response = httpx.get(strict + "/api/info", timeout=30)
        assert response.status_code == 200, response.text
        # the first ones were closed as the later came, before their 1 s ran out
        assert [answer(c) for c in slow[: -SHORT.max_connections]] == [b""] * 8


def test_when_every_connection_is_busy_a_new_one_gets_503(strict):
    # Connections mid-upload are busy with a request, not waiting for one: none is closed
    # to make room, so the one past the limit is answered 503.
    with ExitStack() as stack:
        for _ in range(SHORT.max_connections):
            stack.callback(connect(strict, UPLOAD_HEAD).close)
        response = httpx.get(strict + "/api/info", timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert list(response.json()) == ["error"] and "busy" in response.json()["error"]


def test_300_slow_connections_under_256_file_descriptors(indexed):
    """The report's case: `serve` with ulimit -n 256 and 300 connections that send half a
    request line went silent, logging "Too many open files" 100,000 times."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = subprocess.Popen(
        [sys.executable, "-m", "threetowers", "serve", str(indexed.index_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert b"serving" in server.stdout.readline()
        while True:  # "serving" is printed just before uvicorn listens
            try:
                httpx.get(url + "/api/info", timeout=30)
                break
            except httpx.ConnectError:
                assert server.poll() is None, server.communicate()
                time.sleep(0.1)
        with ExitStack() as stack:
            for _ in range(300):
                stack.callback(connect(url, b"GET /api/in").close)
            response = httpx.get(url + "/api/info", timeout=30)
            assert response.status_code == 200, response.text
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    assert b"Too many open files" not in errors and len(errors.splitlines()) < 10, errors


def test_accept_errors_are_logged_once_a_minute():
    now = [0.0]
    quiet = OnceEvery(ACCEPT_ERROR, 60.0, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    accept_error = f"{ACCEPT_ERROR}\nsocket: <asyncio.TransportSocket fd=6>"
    passed = []
    for second in range(0, 150):
        now[0] = float(second)
        for _ in range(1000):  # asyncio's accept loop logs one per retry
            entry = record(accept_error)
            if quiet.filter(entry):
                passed.append(entry.getMessage())
        assert quiet.filter(record("another asyncio error"))  # the rest pass
    assert len(passed) == 3  # at 0, 60 and 120 s
    assert passed[0] == accept_error
    assert passed[1].endswith("(59999 more since the last one, not logged)")


def test_too_few_open_files_for_a_server_is_a_user_error(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (64, 1024))
    with pytest.raises(UserError, match="ulimit -n is 64: too few open files for a server"):
        Bounds.for_open_files(Limits(), {})
