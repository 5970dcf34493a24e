"""project/experiments/report.py, pure functions of the paper experiment's records: the
summary (mean and sample std over seeds), ties within the seed spread, the findings; and a
run whose eval.json lacks what the report needs; the α-sweep averaged over seeds, one run's
record and results.md; the mixture weights chosen on val, which every experiment reports."""

from __future__ import annotations

import json
import statistics

import pytest

from threetowers.errors import UserError
from threetowers.project.experiments.report import (
    METRICS,
    SWEEP_METRICS,
    chosen_on_val,
    compare,
    findings,
    markdown,
    mean_sweeps,
    run_record,
    summarise,
)


def record(setting, method, seed, value, sweep=None):
    out = {"setting": setting, "method": method, "seed": seed} | {k: value for k in METRICS}
    if sweep is not None:
        out["alpha_sweep"] = [
            {"alpha": a, "zeroshot_top1": v, "i2t_R@1": v, "t2i_R@1": v} for a, v in sweep
        ]
    return out


def test_summary_is_mean_and_sample_std_over_seeds():
    values = [41.0, 44.5, 40.0]
    summary = summarise([record("none", "clip", s, v) for s, v in enumerate(values)])
    mean, std = summary[("none", "clip")]["i2t_R@1"]
    assert mean == pytest.approx(sum(values) / 3)
    assert std == pytest.approx(statistics.stdev(values))
    assert summary[("none", "clip")]["seeds"] == 3


def test_gaps_within_the_seed_spread_are_ties():
    assert compare((50.0, 1.0), (47.0, 1.0)) == ">"
    assert compare((50.0, 2.0), (47.0, 1.0)) == "tie"
    assert compare((40.0, 0.5), (47.0, 1.0)) == "<"
    assert compare((40.0, 0.0), (40.0, 0.0)) == "tie"


def test_findings_name_each_claim_with_its_numbers():
    sweep_peak = [(0.0, 20.0), (0.5, 60.0), (1.0, 50.0)]
    records = [
        record("none", "clip", 0, 30.0),
        record("mismatched", "lit", 0, 10.0),
        record("mismatched", "3t", 0, 40.0, sweep_peak),
    ]
    checks = findings(summarise(records), mean_sweeps(records), ["mismatched"])
    by_claim = {c["claim"]: c for c in checks}
    assert by_claim["zero-shot: 3T > CLIP"]["status"] == "holds"
    assert by_claim["mismatched zero-shot: LiT < CLIP"]["status"] == "holds"
    assert by_claim["retrieval i2t_R@1: 3T > LiT"]["detail"] == "3T 40.0 ± 0.0 vs LiT 10.0 ± 0.0"
    assert by_claim["some α in (0, 1) ≥ both ends"]["status"] == "holds"
    flat = [record("mismatched", "3t", 0, 40.0, [(0.0, 20.0), (0.5, 30.0), (1.0, 50.0)])]
    (alpha,) = findings(summarise(flat), mean_sweeps(flat), [])
    assert alpha["status"] == "fails"


def test_an_eval_json_without_the_worlds_benchmarks_is_a_user_error(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"step": 20, "i2t_R@1": 80.0}))
    with pytest.raises(UserError, match="eval.json lacks .*leave eval.retrieval and eval.zeroshot"):
        run_record("matched", "3t", 0, tmp_path)


def test_summary_keeps_settings_and_methods_apart_and_one_seed_has_no_spread():
    records = [
        record("matched", "3t", 0, 10.0),
        record("matched", "3t", 1, 14.0),
        record("matched", "lit", 0, 30.0),
        record("mismatched", "3t", 0, 50.0),
    ]
    summary = summarise(records)
    assert set(summary) == {("matched", "3t"), ("matched", "lit"), ("mismatched", "3t")}
    # sample std of (10, 14): sqrt(((10-12)^2 + (14-12)^2) / (2 - 1))
    assert summary[("matched", "3t")]["t2i_R@5"] == pytest.approx((12.0, 8**0.5))
    assert summary[("matched", "lit")]["fewshot_top1"] == (30.0, 0.0)
    assert summary[("mismatched", "3t")]["seeds"] == 1


def test_a_gap_exactly_the_two_spreads_is_a_tie_and_a_hair_more_is_not():
    assert compare((12.0, 1.5), (10.0, 0.5)) == "tie"
    assert compare((12.25, 1.5), (10.0, 0.5)) == ">"
    assert compare((10.0, 0.5), (12.25, 1.5)) == "<"


def test_each_claim_holds_ties_or_fails_by_the_seed_spread():
    records = [
        *(record("none", "clip", s, v) for s, v in enumerate([40.0, 42.0])),  # 41 ± 1.41
        *(record("matched", "lit", s, v) for s, v in enumerate([50.0, 50.0])),  # 50 ± 0
        *(record("matched", "3t", s, v) for s, v in enumerate([41.0, 43.0])),  # 42 ± 1.41
    ]
    checks = findings(summarise(records), {}, ["matched"])
    status = {c["claim"]: c["status"] for c in checks}
    assert status == {
        "retrieval i2t_R@1: 3T > LiT": "fails",
        "retrieval i2t_R@1: 3T > CLIP": "tie",  # a gap of 1 within 1.41 + 1.41
        "retrieval t2i_R@1: 3T > LiT": "fails",
        "retrieval t2i_R@1: 3T > CLIP": "tie",
        "zero-shot: 3T > CLIP": "tie",
    }  # no sweep given: no α claim; no mismatched setting: none of its claims
    assert all(c["setting"] == "matched" for c in checks)


def test_a_setting_without_its_runs_makes_no_claim():
    records = [record("none", "clip", 0, 30.0), record("matched", "lit", 0, 20.0)]
    assert findings(summarise(records), mean_sweeps(records), ["matched", "imagenet"]) == []


def test_the_sweep_is_averaged_over_seeds_alpha_by_alpha():
    records = [
        record("matched", "3t", 0, 1.0, [(0.0, 10.0), (0.5, 20.0), (1.0, 30.0)]),
        record("matched", "3t", 1, 1.0, [(0.0, 14.0), (0.5, 26.0), (1.0, 30.0)]),
        record("other", "3t", 0, 1.0, [(0.0, 1.0), (1.0, 2.0)]),
        record("matched", "lit", 0, 1.0),  # no sweep: LiT has one tower pair
    ]
    sweeps = mean_sweeps(records)
    assert sweeps["matched"] == [
        {"alpha": 0.0} | {k: 12.0 for k in SWEEP_METRICS},
        {"alpha": 0.5} | {k: 23.0 for k in SWEEP_METRICS},
        {"alpha": 1.0} | {k: 30.0 for k in SWEEP_METRICS},
    ]
    assert [row["alpha"] for row in sweeps["other"]] == [0.0, 1.0]


def test_a_runs_record_is_its_eval_json_and_a_3t_runs_sweep(tmp_path):
    scores = {k: float(i) for i, k in enumerate(METRICS)} | {"loss": 3.0}
    sweep = [{"alpha": a, "extra": 1} | {k: a * 10 for k in SWEEP_METRICS} for a in (0.0, 1.0)]
    (tmp_path / "eval.json").write_text(json.dumps(scores | {"alpha_sweep": sweep}))
    lit = run_record("matched", "lit", 2, tmp_path)
    assert lit == {"setting": "matched", "method": "lit", "seed": 2, "run_dir": str(tmp_path)} | {
        k: scores[k] for k in METRICS
    }
    three = run_record("matched", "3t", 2, tmp_path)
    assert three["alpha_sweep"] == [
        {"alpha": a} | {k: a * 10 for k in SWEEP_METRICS} for a in (0.0, 1.0)
    ]


def test_the_markdown_table_has_a_row_per_run_group_in_clip_lit_3t_order():
    records = [
        record("matched", "3t", 0, 40.0),
        record("matched", "3t", 1, 44.0),
        record("none", "clip", 0, 30.0),
        record("none", "clip", 1, 30.0),
        record("matched", "lit", 0, 20.0),
        record("matched", "lit", 1, 22.0),
    ]
    summary = summarise(records)
    text = markdown(summary, findings(summary, {}, ["matched"]), {}, ["matched"], "splits")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "±" in line]
    names = [row.split(" | ")[:2] for row in rows[:3]]
    assert names == [["| —", "CLIP"], ["| matched", "LiT"], ["| matched", "3T"]]
    assert "| 42.0 ± 2.8 |" in rows[2]  # mean 42, sample std 2 * sqrt(2)
    assert "Seeds per row: 2." in text
    assert "noise included" not in text


def test_one_seed_shows_no_spread_and_says_so():
    summary = summarise([record("none", "clip", 0, 30.0)])
    text = markdown(summary, [], {}, [], "splits")
    assert "| — | CLIP |" + " 30.0 |" * len(METRICS) in text.splitlines()
    assert "With one seed there is no spread" in text


def alpha_sweep(values: list[float]) -> dict:
    """eval.json's alpha_sweep at alpha 0, 0.5, 1 with every metric at ``values``."""
    rows = zip((0.0, 0.5, 1.0), values, strict=True)
    return {"alpha_sweep": [{"alpha": a} | {k: v for k in METRICS} for a, v in rows]}


def test_mixture_weights_are_chosen_on_val_and_reported_on_test():
    chosen = chosen_on_val(
        alpha_sweep([10.0, 30.0, 20.0]), alpha_sweep([5.0, 1.0, 9.0]), ("h",), METRICS
    )
    assert chosen["t2i_R@5"] == {"weights": {"f": 1.0, "h": 0.0}, "val": 9.0, "test": 20.0}
    tied = chosen_on_val(
        alpha_sweep([10.0, 30.0, 20.0]), alpha_sweep([7.0, 7.0, 1.0]), ("h",), METRICS
    )
    assert tied["i2t_R@1"]["weights"] == {"f": 0.0, "h": 1.0}, "a tie: the first in order"
    grid = [
        {"weights": {"f": w, "timg": 0.0, "ttxt": 0.0, "t": 1 - w}} | {k: 10 * w for k in METRICS}
        for w in (0.2, 0.8)
    ]
    val = [row | {k: 10 - row[k] for k in METRICS} for row in grid]
    chosen = chosen_on_val(
        {"alpha_grid": grid}, {"alpha_grid": val}, ("timg", "ttxt", "t"), METRICS
    )
    assert chosen["zeroshot_top1"]["weights"]["t"] == pytest.approx(0.8)
    assert chosen["zeroshot_top1"]["test"] == pytest.approx(2.0)
    other = [row | {"weights": {"f": 0.5}} for row in grid]
    with pytest.raises(ValueError, match="different weights"):
        chosen_on_val({"alpha_grid": grid}, {"alpha_grid": other}, ("timg", "ttxt", "t"), METRICS)
