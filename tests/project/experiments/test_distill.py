"""``threetowers reproduce --experiment distill``: the plan, the teacher's and each student's
config (the terms its loss has), and a --quick run on a tiny world: a teacher trained and
exported, its export read back by the students as a frozen pair (the report's functions:
test_distill_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.experiments import tiny_experiment
from threetowers.apps.export.open_clip import refusals
from threetowers.cli import main
from threetowers.config import ConfigError, load_config, load_experiment_config
from threetowers.config.root import model_term_weights
from threetowers.project.experiments.distill import (
    STUDENTS,
    TEACHER,
    export_dir,
    plan,
    student_config,
    teacher_config,
)
from threetowers.project.experiments.distill_report import METRICS
from threetowers.project.experiments.reproduce import RunSpec


def test_plan_is_the_teacher_then_five_students_a_seed():
    names = [spec.name for spec in plan(3)]
    assert names[:6] == [
        "teacher-3t-seed0",
        "none-clip-seed0",
        "imagenet-3t-seed0",
        "pair-3t-seed0",
        "both-3t-seed0",
        "distill-3t-seed0",
    ]
    assert len(names) == 1 + 15 == len(set(names)) and names.count(TEACHER.name) == 1


def test_the_teacher_is_large_longer_trained_and_exportable(tmp_path):
    cfg = load_experiment_config("reproduce")
    teacher = teacher_config(cfg, tmp_path)
    image, text = teacher.model.image, teacher.model.text
    # scaling's L: the preset's 96-wide towers 4/3 as wide, one layer deeper
    assert (image.width, image.heads, image.depth, text.width, text.depth) == (128, 4, 3, 128, 2)
    assert image.class_token and image.pool == "gap" and text.causal and text.pool == "eot"
    assert teacher.model.mode == "3t" and [t.backbone for t in teacher.model.frozen] == [
        "efficientnet_lite0"
    ]
    assert refusals(teacher) == []
    student = student_config(cfg, RunSpec("imagenet", "3t", 0), tmp_path)
    assert (teacher.train.steps, student.train.steps) == (6500, 3250)
    assert teacher.train.run_dir == str(tmp_path / "runs" / "teacher-3t-seed0")
    # a config whose teacher OpenCLIP cannot hold is refused before anything trains
    bad = load_experiment_config("reproduce", ["model.image.pool=map"])
    with pytest.raises(ConfigError, match="model.image.pool map"):
        teacher_config(bad, tmp_path)


def terms(cfg) -> set[str]:
    """The terms the run's loss computes (a term of weight 0 is not computed)."""
    weights = model_term_weights(cfg.model, cfg.loss)
    return {name for name, weight in weights.items() if weight > 0} or {"f_g"}


def test_each_student_names_exactly_its_terms(tmp_path):
    cfg = load_experiment_config("reproduce")
    teacher = str(export_dir(cfg, tmp_path))
    students = {s: student_config(cfg, RunSpec(s, m, 1), tmp_path) for s, m in STUDENTS.items()}
    sides = {"ftimg_timg", "gtimg_timg", "fttxt_ttxt", "gttxt_ttxt"}
    assert terms(students["none"]) == {"f_g"} and students["none"].model.mode == "clip"
    assert terms(students["imagenet"]) == {"f_g", "fh_h", "gh_h"}
    assert terms(students["pair"]) == {"f_g", "fg_t"} | sides
    assert terms(students["both"]) == {"f_g", "fh_h", "gh_h", "fg_t"} | sides
    assert terms(students["distill"]) == {"f_g", "fg_t"}
    weights = model_term_weights(students["both"].model, students["both"].loss)
    assert weights["fh_h"] == weights["ftimg_timg"] == 0.25 and weights["fg_t"] == 1.0
    for setting, student in students.items():
        image, text = student.model.image, student.model.text
        assert (image.width, image.depth, text.width, text.depth) == (64, 1, 64, 1), setting
        assert (student.train.seed, student.train.steps) == (1, 3250)
        assert [t.path for t in student.model.frozen if t.backbone == "pair"] in ([], [teacher])
    # everything but the model and the run directory is shared, and the sweep but for both
    shared = {"model": True, "train": {"run_dir"}, "eval": {"alpha_sweep"}}
    assert len({s.model_dump_json(exclude=shared) for s in students.values()}) == 1
    assert [s for s, cfg in students.items() if not cfg.eval.alpha_sweep] == ["both"]


def test_quick_distill_trains_exports_teaches_and_reports(tmp_path, capsys):
    out = tmp_path / "out"
    overrides = tiny_experiment(tmp_path)
    argv = ["reproduce", "--experiment", "distill", "--quick", "--quiet", "--out", str(out)]
    assert main(argv + overrides) == 0
    assert "| 3T + teacher, weights chosen on val |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["setting"], r["method"]) for r in runs] == [
        ("teacher", "3t"),
        ("none", "clip"),
        ("imagenet", "3t"),
        ("pair", "3t"),
        ("both", "3t"),
        ("distill", "3t"),
    ]
    assert results["steps"] == {"teacher": 10, "student": 5}
    for run in runs:
        eval_json = json.loads((Path(run["run_dir"]) / "eval.json").read_text())
        assert all(run[k] == eval_json[k] for k in METRICS)
    # the students read the teacher's export, made by `threetowers export --format open_clip`
    student = load_config(Path(runs[4]["run_dir"]) / "config.yaml")
    folder = Path(student.model.frozen[1].path)
    exported = json.loads((folder / "open_clip_config.json").read_text())["threetowers"]
    assert exported["run"] == runs[0]["run_dir"] and exported["step"] == 10
    # the pair's students: weights over f, the sides' pairs and the teacher's own score
    pair = runs[3]["best_alpha"]["i2t_R@1"]["weights"]
    assert set(pair) == {"f", "timg", "ttxt", "t"} and sum(pair.values()) == pytest.approx(1.0)
    assert "best_alpha" not in runs[4], "h and the pair: evaluated without the 1001-point grid"
    assert set(results["gap_closed"]) == {
        "3T + Lite0",
        "3T + teacher",
        "3T + Lite0 + teacher",
        "distillation alone",
    }
    assert (out / "distill.png").read_bytes().startswith(b"\x89PNG")
    # a second call trains, exports and evaluates nothing again
    files = [*out.rglob("eval*.json"), *folder.iterdir()]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert main(argv + overrides) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
