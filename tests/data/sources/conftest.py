"""Fixtures of the source tests."""

from __future__ import annotations

import pytest

from tests.helpers.shards import SHARD_SIZES, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of SHARD_SIZES samples, one with a stray image-less member (an orphan)."""
    return write_shards(tmp_path_factory.mktemp("wds") / "shards", SHARD_SIZES, stray=True)
