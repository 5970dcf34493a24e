"""Fixtures of the source tests."""

from __future__ import annotations

import json

import pytest

from tests.helpers.shards import SHARD_SIZES, png, write_shards

N_TABLE = 22


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of SHARD_SIZES samples, one with a stray image-less member (an orphan)."""
    return write_shards(tmp_path_factory.mktemp("wds") / "shards", SHARD_SIZES, stray=True)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The same 22 pairs as a CSV and as JSONL (odd rows with three captions)."""
    root = tmp_path_factory.mktemp("tables")
    lines, records = ["image,caption"], []
    for index in range(N_TABLE):
        (root / f"{index}.png").write_bytes(png(index))
        lines.append(f'{index}.png,"caption {index}"')
        captions = [f"caption {index} {j}" for j in range(3 if index % 2 else 1)]
        records.append(json.dumps({"image": f"{index}.png", "captions": captions}))
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    (root / "pairs.jsonl").write_text("\n".join(records) + "\n")
    return root
