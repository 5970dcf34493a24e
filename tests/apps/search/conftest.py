"""A tiny trained 3T run, its index of the world's test images, and a live server on it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.runs import tiny_run_config
from tests.helpers.search_server import running
from threetowers.apps.search.build import build_index
from threetowers.apps.search.engine import QueryEncoder, SearchIndex
from threetowers.apps.search.items import index_source
from threetowers.apps.search.server import create_app
from threetowers.model.trained import TrainedRun, load_trained
from threetowers.trainer.loop import train


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
def live(indexed) -> Iterator[LiveServer]:
    """``threetowers serve``'s app and server configuration, on a loopback port."""
    index, encoder = SearchIndex(indexed.index_dir), QueryEncoder(indexed.run)
    with running(create_app(index, encoder)) as url:
        yield LiveServer(url, index, encoder)
