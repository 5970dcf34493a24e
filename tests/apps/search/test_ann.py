"""apps/search/ann.py beyond what test_build.py checks (exact scores, measured recall): the
tuned search parameter is the smallest that reaches the target, a search asks for more rows
than exist, indexes written whole and read back alike, and a failed write as an OSError."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from threetowers.apps.search import ann


def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, dim))
    x = centres[rng.integers(0, 24, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind,name,first", [("ivf", "nprobe", 1), ("hnsw", "efSearch", 16)])
def test_the_tuned_parameter_is_the_smallest_power_of_two_reaching_the_target(kind, name, first):
    vectors, queries = clustered(1500), clustered(60, seed=1)
    target = 0.97
    index, record = ann.build_ann(vectors, queries, kind, recall_target=target)
    value = record.params[name]
    assert set(record.params) == {name} and record.sample_queries == 60
    truth = ann.exact_top(vectors, queries, 10)

    def recall_at(parameter: int) -> float:
        probe = ann.AnnRecord(kind, {name: parameter})
        return ann.recall(ann.ann_search(index, probe, queries, 10)[1], truth)

    assert record.recall_at_10 == recall_at(value) >= target
    assert value == first or recall_at(value // 2) < target
    assert (value // first) & (value // first - 1) == 0  # first * 2^n


def test_asking_for_more_rows_than_exist_pads_with_minus_one():
    vectors, queries = clustered(3), clustered(2, seed=1)
    index, record = ann.build_ann(vectors, queries, "exact")
    scores, rows = ann.ann_search(index, record, queries, 5)
    assert rows.shape == (2, 5) and (rows[:, 3:] == -1).all()
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2]
    direct = (queries.astype(np.float64) @ vectors.T.astype(np.float64)).max(axis=1)
    np.testing.assert_allclose(scores[:, 0], direct, atol=1e-6)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match=r"one of \('exact', 'hnsw', 'ivf'\), got 'flat'"):
        ann.build_ann(clustered(10), clustered(2), "flat")


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_an_index_written_and_read_back_answers_alike_and_its_size_is_counted(kind, tmp_path):
    vectors, queries = clustered(600), clustered(20, seed=1)
    index, record = ann.build_ann(vectors, queries, kind)
    path = tmp_path / "images.faiss"
    ann.write_ann(index, path)
    assert ann.serialized_size(index) == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["images.faiss"]  # no temporary left
    again = ann.read_ann(path)
    for got, want in zip(
        ann.ann_search(again, record, queries, 10),
        ann.ann_search(index, record, queries, 10),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_a_failed_write_is_the_oserror_python_would_raise_and_leaves_nothing(tmp_path):
    index, _ = ann.build_ann(clustered(10), clustered(2), "exact")
    path = tmp_path / "missing-folder" / "images.faiss"
    with pytest.raises(OSError) as caught:
        ann.write_ann(index, path)
    assert caught.value.errno == errno.ENOENT and caught.value.filename == str(path)
    assert not path.parent.exists() and list(tmp_path.iterdir()) == []


def test_the_size_rule_and_the_record_as_json():
    assert ann.choose_kind(ann.EXACT_BELOW - 1) == "exact"
    assert ann.choose_kind(ann.EXACT_BELOW) == "ivf"
    record = ann.AnnRecord("ivf", {"nprobe": 4}, 0.96, 100, 1.5)
    assert record.to_json() == {
        "kind": "ivf",
        "params": {"nprobe": 4},
        "recall_at_10": 0.96,
        "sample_queries": 100,
        "build_seconds": 1.5,
    }
    assert ann.AnnRecord(**record.to_json()) == record
