"""A run directory written by the code before issue 39's reshaping (tests/fixtures/
run_before_issue_39: config keys model.third and loss.weights.fh_h / gh_h, the experiment grid's
sections in its config.yaml, checkpoint names of that time) still resumes exactly, evaluates,
indexes and exports; the old keys are migrated with a warning naming the new ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from threetowers.cli import main
from threetowers.model.trained import load_trained

FIXTURE = Path(__file__).parents[1] / "fixtures" / "run_before_issue_39"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """The fixture's folder copied where its relative paths (world, cache, run) resolve."""
    folder = tmp_path_factory.mktemp("before_39")
    shutil.copytree(FIXTURE / "run", folder / "run")
    return folder


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(actual: dict, expected: dict) -> None:
    numbers = {k: v for k, v in expected.items() if isinstance(v, float)}
    assert {k: actual[k] for k in numbers} == pytest.approx(numbers, rel=1e-6, abs=1e-9)


def test_the_old_run_evaluates_to_its_own_eval_json(old_run, monkeypatch):
    monkeypatch.chdir(old_run)
    assert main(["eval", "run", "--out", "eval_again"]) == 0
    recorded = json.loads((old_run / "run" / "eval.json").read_text())
    _close(json.loads((old_run / "eval_again" / "eval.json").read_text()), recorded)


def test_the_old_run_indexes_exports_and_keeps_its_fingerprint(old_run, monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.chdir(old_run)
    data = "world/retrieval/dataset_world.json"
    assert main(["index", "run", "--data", data, "--out", "index", "--quiet"]) == 0
    manifest = json.loads((old_run / "index" / "manifest.json").read_text())
    assert manifest["images"] > 0
    assert main(["export", "run", "--format", "open_clip", "--out", "exported"]) == 0
    assert (old_run / "exported" / "open_clip_config.json").is_file()
    # a re-run of the finished run trains nothing: its config.yaml, read as the same config,
    # stays as the old code wrote it, and the index still belongs to the run
    written = (old_run / "run" / "config.yaml").read_bytes()
    with pytest.warns(FutureWarning):
        assert main(["train", "run/config.yaml", "--run-dir", "run", "--quiet"]) == 0
    assert (old_run / "run" / "config.yaml").read_bytes() == written
    assert load_trained(old_run / "run").fingerprint == manifest["fingerprint"]


def test_the_old_run_continues_as_the_old_code_did(old_run, monkeypatch, capsys):
    monkeypatch.chdir(old_run)
    with pytest.warns(FutureWarning) as warned:
        status = main(["train", "run/config.yaml", "train.steps=6", "--run-dir", "run", "--quiet"])
    assert status == 0, capsys.readouterr().err
    said = " ".join(str(w.message) for w in warned)
    assert "model.third" in said and "model.frozen" in said
    assert "loss.weights.fh_h" in said
    expected = json.loads((FIXTURE / "continued_to_6.json").read_text())
    steps = [line for line in _metrics(old_run / "run") if line["step"] > 4 and "eval" not in line]
    assert [line["step"] for line in steps] == [5, 6]
    for line, old in zip(steps, expected["metrics"], strict=True):
        _close(line, old)
    _close(json.loads((old_run / "run" / "eval.json").read_text()), expected["eval"])
    # the continued run's config is recorded in today's form
    recorded = (old_run / "run" / "config.yaml").read_text()
    assert "third" not in recorded and "fh_h" not in recorded
