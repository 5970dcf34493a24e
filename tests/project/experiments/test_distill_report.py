"""project/experiments/distill_report.py, pure functions of the distill experiment's records:
the share of the teacher - CLIP gap closed, the table and the questions."""

from __future__ import annotations

import statistics

import pytest

from threetowers.project.experiments.distill_report import (
    CHOSEN,
    METRICS,
    NAMES,
    findings,
    gap_closed,
    table,
)


def record(setting: str, seed: int, value: float, zeroshot: float | None = None) -> dict:
    """A run's record with every metric at ``value`` (zero-shot at ``zeroshot`` if given)."""
    method = "clip" if setting == "none" else "3t"
    scores = {k: value for k in METRICS} | {"zeroshot_top1": zeroshot or value}
    return {"setting": setting, "method": method, "seed": seed} | scores


def test_gap_closed_is_the_share_of_the_teacher_clip_gap():
    teacher = record("teacher", 0, 80.0, zeroshot=90.0)
    clip = [record("none", s, v) for s, v in enumerate((40.0, 44.0, 42.0))]
    pair = [record("pair", s, v) for s, v in enumerate((60.0, 62.0, 70.0))]
    distill = [record("distill", s, 41.0) for s in range(3)]
    shares = gap_closed([teacher, *clip, *pair, *distill])
    # by hand, i2t_R@1: CLIP mean 42, teacher 80, pair mean 64: (64 - 42) / (80 - 42)
    i2t = shares[NAMES["pair"]]["i2t_R@1"]
    assert i2t["fraction"] == pytest.approx(22 / 38) and i2t["gap"] == pytest.approx(38)
    per_seed = [(60 - 40) / (80 - 40), (62 - 44) / (80 - 44), (70 - 42) / (80 - 42)]
    assert i2t["std"] == pytest.approx(statistics.stdev(per_seed))
    assert shares[NAMES["pair"]]["zeroshot_top1"]["fraction"] == pytest.approx(22 / 48)
    # below CLIP is a negative share: (41 - 42) / 38
    assert shares[NAMES["distill"]]["t2i_R@5"]["fraction"] == pytest.approx(-1 / 38)
    assert set(shares) == {NAMES["pair"], NAMES["distill"]}, "only the students that ran"


def test_no_gap_to_close_is_no_share():
    records = [record("teacher", 0, 50.0), record("none", 0, 60.0), record("pair", 0, 70.0)]
    share = gap_closed(records)[NAMES["pair"]]["i2t_R@1"]
    assert share == {"fraction": None, "std": None, "gap": pytest.approx(-10.0)}


def test_table_and_questions():
    records = [record("teacher", 0, 90.0)]
    records += [record("none", s, 40.0 + s) for s in range(3)]
    records += [record("imagenet", s, 50.0) for s in range(3)]
    records += [record("pair", s, 70.0 + s) | {"best_alpha": _chosen(88.0)} for s in range(3)]
    summary = table(records)
    assert list(summary) == [
        NAMES["teacher"],
        NAMES["none"],
        NAMES["imagenet"],
        NAMES["pair"],
        NAMES["pair"] + CHOSEN,
    ]
    assert summary[NAMES["none"]]["i2t_R@1"] == pytest.approx((41.0, 1.0))
    assert summary[NAMES["pair"] + CHOSEN]["t2i_R@5"] == (88.0, 0.0)
    assert summary[NAMES["teacher"]]["seeds"] == 1 and summary[NAMES["pair"]]["seeds"] == 3
    status = {(c["question"], c["metric"]): c["status"] for c in findings(summary)}
    more = "the teacher pair teaches a 3T student more than Lite0"
    assert status[(more, "zeroshot_top1")] == "holds"
    assert status[("the teacher pair beats CLIP", "t2i_R@1")] == "holds"
    assert not any("distillation alone" in q for q, _ in status), "no distill runs, no question"


def _chosen(value: float) -> dict:
    return {k: {"weights": {"f": 0.0, "t": 1.0}, "val": value, "test": value} for k in METRICS}
