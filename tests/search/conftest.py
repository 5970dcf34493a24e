"""A tiny trained 3T run, its index of the world's test images, and a live server on it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from tests.training.test_loop import tiny_run_config
from threetowers.runs.trained import TrainedRun, load_trained
from threetowers.search.build import build_index
from threetowers.search.connections import server_config
from threetowers.search.engine import QueryEncoder, SearchIndex
from threetowers.search.items import index_source
from threetowers.search.server import SECURITY_HEADERS, Limits, create_app
from threetowers.training.loop import train


@dataclass
class Indexed:
    root: Path
    run: TrainedRun
    index_dir: Path
    retrieval: Path  # the Karpathy JSON that was indexed (its test split)


@pytest.fixture(scope="session")
def indexed(tmp_path_factory) -> Indexed:
    root = tmp_path_factory.mktemp("search")
    cfg = tiny_run_config(root / "world", root / "cache", "train.steps=3")
    run = load_trained(train(cfg, root / "run", progress=False))
    retrieval = root / "world" / "retrieval" / "dataset_world.json"
    build_index(run, index_source(data=retrieval), root / "index", progress=False)
    return Indexed(root, run, root / "index", retrieval)


@dataclass
class LiveServer:
    url: str
    index: SearchIndex
    encoder: QueryEncoder


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


@pytest.fixture(scope="session")
def live(indexed) -> Iterator[LiveServer]:
    """``threetowers serve``'s app and server configuration, on a loopback port."""
    index, encoder = SearchIndex(indexed.index_dir), QueryEncoder(indexed.run)
    with running(create_app(index, encoder)) as url:
        yield LiveServer(url, index, encoder)
