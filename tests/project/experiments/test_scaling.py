"""``threetowers reproduce --experiment scaling``: the plan, the runs' configs, the slopes of
3T - LiT through the command, the step check, and a --quick smoke run on a tiny world (the
report's functions: test_scaling_report.py)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.helpers.experiments import tiny_experiment
from threetowers.cli import main
from threetowers.config import load_config, load_experiment_config
from threetowers.errors import UserError
from threetowers.project.experiments.report import HEADLINE
from threetowers.project.experiments.scaling import (
    STEP_CHECK_FACTOR,
    STEPS,
    Point,
    check_sizes,
    plan,
    run_config,
    step_check_points,
)


def test_plan_has_each_run_once_and_whole_seeds_first():
    runs = plan(20000, seeds=3)
    names = [p.name for p in runs]
    assert len(names) == len(set(names))
    longest = STEPS * STEP_CHECK_FACTOR
    per_seed = [p for p in runs if p.steps != longest and p.seed == 0]
    # pairs: 4 sizes x 3 methods; towers: S and L x 3 (M is the base point); third: 2 more
    # x (LiT, 3T)
    assert len(per_seed) == 12 + 6 + 4
    assert {p.steps for p in per_seed} == {STEPS}
    longer = [p for p in runs if p.steps == longest]
    # the largest run of each axis: the base point (every pair), the L towers and Lite2
    assert {(p.pairs, p.towers, p.third, p.method) for p in longer} == {
        (20000, "M", "efficientnet_lite0", m) for m in ("clip", "lit", "3t")
    } | {(20000, "L", "efficientnet_lite0", m) for m in ("clip", "lit", "3t")} | {
        (20000, "M", "efficientnet_lite2", m) for m in ("lit", "3t")
    }
    assert all(p.seed == 0 for p in longer) and len(runs) == 3 * 22 + 8
    # seed 0 and the step checks come before any seed-1 run
    first_seed1 = next(i for i, p in enumerate(runs) if p.seed == 1)
    assert all(p.seed == 0 for p in runs[:first_seed1]) and runs.index(longer[-1]) < first_seed1
    assert "pairs2500-towersM-clip-seed0-steps5x" in names
    assert "pairs20000-towersM-lite2-3t-seed2-steps5x" in names
    assert "pairs20000-towersL-lite0-3t-seed0-steps7.5x" in names


def test_plan_of_one_axis_has_only_its_runs():
    towers = plan(20000, seeds=3, axes=("towers",))
    assert len(towers) == 3 * 9 + 3 and {p.pairs for p in towers} == {20000}
    assert {p.towers for p in towers if p.steps == STEPS * STEP_CHECK_FACTOR} == {"L"}
    third = plan(20000, seeds=3, axes=("third",))
    assert len(third) == 3 * 6 + 2 and {p.method for p in third} == {"lit", "3t"}
    assert {p.third for p in third if p.steps != STEPS} == {"efficientnet_lite2"}
    assert step_check_points(20000, "clip", ("third",)) == {}, "CLIP has no third axis"


def test_run_configs_change_only_their_axis(tmp_path):
    cfg = load_experiment_config("reproduce")
    base = run_config(cfg, Point(20000), tmp_path)
    small = run_config(cfg, Point(2500), tmp_path)
    assert base.data.world.dir == cfg.data.world.dir
    assert small.data.world.dir == str(tmp_path / "worlds" / "pairs2500")
    assert small.data.world.train_pairs == 2500
    # the world's test and validation sets stay; only the unused classifier sets shrink
    for key in ("seed", "image_size", "val_pairs", "retrieval_test", "zeroshot_per_class"):
        assert getattr(small.data.world, key) == getattr(base.data.world, key)
    assert small.model == base.model
    assert small.train.model_dump(exclude={"run_dir"}) == base.train.model_dump(exclude={"run_dir"})
    big = run_config(cfg, Point(20000, "L"), tmp_path).model
    assert (big.image.width, big.image.heads, big.image.depth) == (128, 4, 3)
    assert (big.text.width, big.text.heads, big.text.depth) == (128, 4, 2)
    assert big.embed_dim == base.model.embed_dim and big.text.pool == base.model.text.pool
    s = run_config(cfg, Point(20000, "S"), tmp_path).model
    assert (s.image.width, s.image.depth, s.text.width, s.text.depth) == (64, 1, 64, 1)
    assert base.model == cfg.model.model_copy(update={"mode": "3t", "frozen": base.model.frozen}), (
        "M is the config's own towers"
    )
    lite2 = run_config(cfg, Point(20000, third="efficientnet_lite2", method="lit"), tmp_path)
    assert lite2.model.frozen[0].backbone == "efficientnet_lite2" and lite2.model.mode == "lit"
    assert base.train.steps == small.train.steps == round(STEPS * cfg.train.steps) == 6500
    towers_l = run_config(cfg, Point(20000, "L"), tmp_path)
    longer = run_config(cfg, step_check_points(20000, "3t", ("towers",))["towers"], tmp_path)
    assert longer.model == towers_l.model
    assert longer.train.steps == round(1.5 * STEPS * cfg.train.steps) == 9750
    assert longer.train.run_dir != towers_l.train.run_dir


def test_too_small_a_training_set_is_refused():
    cfg = load_experiment_config("reproduce", ["data.world.train_pairs=1000"])
    with pytest.raises(ValueError, match="125 pairs, fewer than one batch") as error:
        check_sizes(cfg)
    assert isinstance(error.value, UserError)  # one line from the command line, exit 2


def _samples(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_quick_scaling_runs_every_point_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "scaling"
    overrides = tiny_experiment(tmp_path) + ["reproduce.workers=1"]
    main(["reproduce", "--experiment", "scaling", "--quick", "--out", str(out), *overrides])
    results = json.loads((out / "results.json").read_text())
    axes = {(r["size_axis"], r["method"]) for r in results["runs"]}
    assert axes == {(a, m) for a in ("pairs", "towers") for m in ("clip", "lit", "3t")} | {
        ("third", "lit"),
        ("third", "3t"),
    }
    pairs = sorted({r["size"] for r in results["runs"] if r["size_axis"] == "pairs"})
    assert pairs == [32, 64, 128, 256]
    towers = {r["size_label"]: r["size"] for r in results["runs"] if r["size_axis"] == "towers"}
    assert towers["S"] < towers["M"] < towers["L"]
    third = {r["size_label"]: r["size"] for r in results["runs"] if r["size_axis"] == "third"}
    assert third["efficientnet_lite0"] < third["efficientnet_lite1"] < third["efficientnet_lite2"]
    for record in results["runs"]:
        eval_json = json.loads((Path(record["run_dir"]) / "eval.json").read_text())
        assert all(record[k] == eval_json[k] for k in HEADLINE)
    # a record's run trained what its point says
    small = next(r for r in results["runs"] if r["size"] == 32)
    run_cfg = load_config(Path(small["run_dir"]) / "config.yaml")
    assert run_cfg.data.world.train_pairs == 32
    assert {(c["axis"], c["metric"]) for c in results["claim"]} == {
        (a, k) for a in ("pairs", "towers", "third") for k in HEADLINE
    }
    assert {(s["axis"], s["size_label"], s["method"]) for s in results["step_check"]} == {
        ("pairs", "256", m) for m in ("clip", "lit", "3t")
    } | {("towers", "L", m) for m in ("clip", "lit", "3t")} | {
        ("third", "efficientnet_lite2", m) for m in ("lit", "3t")
    }
    for name in ("results.md", "scaling_zeroshot_top1.png", "scaling_i2t_R1.png"):
        assert (out / name).stat().st_size > 0
    assert "3T's gain over LiT grows with size" in capsys.readouterr().out
    # the smaller world is a prefix of the full one, with the very same test sets
    world = tmp_path / "world"
    small_world = out / "worlds" / "pairs32"
    full = _samples(world / "pairs" / "train-000000.tar")
    part = _samples(small_world / "pairs" / "train-000000.tar")
    assert len(part) == 32 * len(full) // 64 and all(
        full[name] == data for name, data in part.items()
    )
    for rel in ("retrieval/dataset_world.json", "pairs/val-000000.tar"):
        if rel.endswith(".tar"):
            assert _samples(world / rel) == _samples(small_world / rel)
        else:
            assert (world / rel).read_bytes() == (small_world / rel).read_bytes()
    images = sorted((world / "zeroshot_objects").rglob("*.png"))
    assert images and all(
        p.read_bytes() == (small_world / p.relative_to(world)).read_bytes() for p in images
    )


def test_quick_scaling_of_one_axis_reports_only_that_axis(tmp_path):
    out = tmp_path / "scaling"
    overrides = tiny_experiment(tmp_path) + [
        "reproduce.workers=1",
        "reproduce.scaling_axes=[towers]",
    ]
    main(["reproduce", "--experiment", "scaling", "--quick", "--out", str(out), *overrides])
    results = json.loads((out / "results.json").read_text())
    assert {r["size_axis"] for r in results["runs"]} == {"towers"}
    assert {c["axis"] for c in results["claim"]} == {"towers"}
    assert results["steps"] == 10  # 5 x quick_steps=2
    assert not (out / "worlds").exists(), "no smaller world without the pairs axis"
    for record in results["runs"]:
        assert load_config(Path(record["run_dir"]) / "config.yaml").train.steps == 10
    (check, *_) = results["step_check"]
    assert (check["axis"], check["size_label"]) == ("towers", "L")
    assert (check["steps"], check["longer_steps"]) == (10, 15)
    assert "at 10 steps | at 15 |" in (out / "results.md").read_text()

    # A run is finished by its records alone (docs/results/scaling/record.sh keeps these three
    # files so that the experiment can span sessions): with only them left, nothing trains.
    records = {}
    for run in (out / "runs").iterdir():
        for path in run.iterdir():
            if path.name not in ("config.yaml", "eval.json", "environment.json"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        records[run.name] = (run / "eval.json").read_bytes()
    main(["reproduce", "--experiment", "scaling", "--quick", "--out", str(out), *overrides])
    for run in (out / "runs").iterdir():
        assert not (run / "checkpoints").exists(), f"{run.name} trained again"
        assert (run / "eval.json").read_bytes() == records[run.name]
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
