"""``threetowers reproduce``: the report's statistics, and a --quick smoke run on a tiny world."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.helpers.experiments import tiny_experiment
from threetowers.cli import main
from threetowers.project.experiments.report import (
    METRICS,
    compare,
    findings,
    mean_sweeps,
    summarise,
)
from threetowers.project.experiments.reproduce import plan


def record(setting, method, seed, value, sweep=None):
    out = {"setting": setting, "method": method, "seed": seed} | {k: value for k in METRICS}
    if sweep is not None:
        out["alpha_sweep"] = [
            {"alpha": a, "zeroshot_top1": v, "i2t_R@1": v, "t2i_R@1": v} for a, v in sweep
        ]
    return out


def test_plan_trains_clip_once_per_seed_and_lit_3t_per_setting():
    runs = plan(["matched", "imagenet"], seeds=2)
    assert [r.name for r in runs[:5]] == [
        "none-clip-seed0",
        "matched-lit-seed0",
        "matched-3t-seed0",
        "imagenet-lit-seed0",
        "imagenet-3t-seed0",
    ]
    assert len(runs) == 10 and len({r.name for r in runs}) == 10


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


def test_quick_reproduce_runs_every_setting_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    overrides = tiny_experiment(tmp_path) + [
        "pretrain.cnn_widths=[8,16]",
        "pretrain.image_size=32",
        "pretrain.batch_size=16",
        "pretrain.num_workers=0",
        "reproduce.quick_pretrain_steps=2",
    ]
    argv = ["reproduce", "--quick", "--quiet", "--out", str(out), *overrides]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| — | CLIP |" in printed and "| mismatched | 3T |" in printed

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["setting"], r["method"]) for r in runs] == [
        ("none", "clip"),
        ("matched", "lit"),
        ("matched", "3t"),
        ("mismatched", "lit"),
        ("mismatched", "3t"),
        ("imagenet", "lit"),
        ("imagenet", "3t"),
    ]
    for run in runs:
        assert run["seed"] == 0 and all(0 <= run[k] <= 100 for k in METRICS)
        sweep = run.get("alpha_sweep")
        assert (sweep is not None) == (run["method"] == "3t")
        if sweep:
            assert [row["alpha"] for row in sweep] == pytest.approx([i / 10 for i in range(11)])
    assert set(results["classifiers"]) == {"matched", "mismatched"}
    shared = (out / "tokenizer.json").read_text()  # trained once, read by every run
    assert all((Path(run["run_dir"]) / "tokenizer.json").read_text() == shared for run in runs)
    assert results["config"]["train"]["steps"] == 2
    for figure in ("bars.png", "alpha.png"):
        assert (out / figure).read_bytes().startswith(b"\x89PNG")

    # a second call trains nothing: every run is finished, every classifier reused
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    assert json.loads((out / "results.json").read_text())["runs"] == runs

    # classifiers pretrained differently are new files; exactly the runs that read them redo
    argv[argv.index("reproduce.quick_pretrain_steps=2")] = "reproduce.quick_pretrain_steps=3"
    assert main(argv) == 0
    redone = {
        path.relative_to(out / "runs").parts[0]
        for path in out.glob("runs/*/checkpoints/*/model.safetensors")
        if stamps.get(path) != path.stat().st_mtime_ns
    }
    assert redone == {f"{s}-{m}-seed0" for s in ("matched", "mismatched") for m in ("lit", "3t")}
    assert len(list((out / "classifiers").glob("*.safetensors"))) == 4
