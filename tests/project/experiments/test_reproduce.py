"""``threetowers reproduce``: the plan, and a --quick smoke run on a tiny world (the report's
statistics: test_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.experiments import tiny_experiment
from threetowers.cli import main
from threetowers.project.experiments.report import METRICS
from threetowers.project.experiments.reproduce import plan


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
