"""Continuing a finished run for more steps: a restarted schedule, recorded, resumed exactly."""

from __future__ import annotations

import json
import shutil

import torch
import yaml

from tests.helpers.runs import final_weights, tiny_run_config
from threetowers.trainer.loop import train
from threetowers.trainer.optim import warmup_cosine


def losses(run) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def trace(records: dict[int, dict]) -> dict[int, tuple[float, float]]:
    """Each step's loss and lr (not its speed, which differs from run to run)."""
    return {step: (r["loss"], r["lr"]) for step, r in records.items()}


def test_a_finished_run_continues_with_a_restarted_schedule_and_resumes_exactly(
    world_dir,  # noqa: F811
    tmp_path,
):
    def config(steps: int):
        return tiny_run_config(
            world_dir,
            tmp_path / "cache",
            "model.mode=clip",
            f"train.steps={steps}",
            "train.checkpoint_every=2",
        )

    run = train(config(4), tmp_path / "run", progress=False)
    first = losses(run)
    train(config(8), run, progress=False)
    continued = losses(run)
    assert list(continued) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert {step: continued[step] for step in first} == first  # the first 4 steps as they were
    # The lr logged at step s is the one of step s + 1: after the first run's cosine reached 0,
    # 2 warmup steps and a cosine to 0 over the 4 steps added.
    lr = config(8).train.lr
    assert first[4]["lr"] == 0.0
    for step in (5, 6, 7, 8):
        assert continued[step]["lr"] == lr * warmup_cosine(2, 4)(step - 4), step
    assert [continued[s]["lr"] / lr for s in (5, 6, 7, 8)] == [1.0, 1.0, 0.5, 0.0]
    recorded = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (recorded["steps"], recorded["continued_from"]) == (8, [4])
    assert json.loads((run / "eval.json").read_text())["step"] == 8

    # Killed in the middle of the continuation, or before its first checkpoint: the same
    # command resumes it to the same weights and lrs.
    expected = final_weights(run)
    for lost in (["step_00000008"], ["step_00000008", "step_00000006"]):
        for name in lost:
            shutil.rmtree(run / "checkpoints" / name)
        train(config(8), run, progress=False)
        got = final_weights(run)
        for key in expected:
            assert torch.equal(expected[key], got[key]), (lost, key)
        assert trace(losses(run)) == trace(continued)

    # and it continues again: the steps of each continuation are recorded
    train(config(12), run, progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["continued_from"] == [4, 8]
    assert [losses(run)[s]["lr"] / lr for s in (9, 10, 11, 12)] == [1.0, 1.0, 0.5, 0.0]
