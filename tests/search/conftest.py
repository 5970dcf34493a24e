"""A tiny trained 3T run, its index of the world's test images, and a live server on it."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from tests.training.test_loop import tiny_run_config
from threetowers.runs.trained import TrainedRun, load_trained
from threetowers.search.build import build_index
from threetowers.search.engine import QueryEncoder, SearchIndex
from threetowers.search.items import index_source
from threetowers.search.server import create_app
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


@pytest.fixture(scope="session")
def live(indexed) -> LiveServer:
    """``threetowers serve``'s app on a free loopback port, in a thread of this process."""
    index, encoder = SearchIndex(indexed.index_dir), QueryEncoder(indexed.run)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(index, encoder), host="127.0.0.1", port=port, log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield LiveServer(f"http://127.0.0.1:{port}", index, encoder)
    server.should_exit = True
    thread.join(timeout=10)
