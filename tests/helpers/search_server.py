"""Running the search server in a thread on a free port, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from threetowers.apps.search.connections import server_config
from threetowers.apps.search.server import SECURITY_HEADERS, Limits


@contextmanager
def running(app, limits: Limits | None = None) -> Iterator[str]:
    """``app`` served as ``threetowers serve`` serves it (its uvicorn config, under
    ``limits``) on a free loopback port, in a thread of this process; its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = limits or Limits()
    config = server_config(app, "127.0.0.1", port, limits, SECURITY_HEADERS, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
