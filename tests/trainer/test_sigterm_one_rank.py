"""SIGTERM to one rank of ``torchrun --nproc_per_node 2 -m threetowers train`` (a cluster
stopping one process of a job): every rank stops at the same step, the checkpoint saves it,
the job exits 0, and re-running the command ends as the uninterrupted run did; with
``train.parallel`` ddp and fsdp."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.trainer.test_ddp_train import WORLD, train_records, weights, write_config, write_table

# An epoch is 6 steps: rank 1 is signalled in the second (the resume re-plans a later epoch
# mid-way), and at about 30 ms a step on 2 CPU cores seconds of training are left then, so
# the stop falls well inside the run.
STEPS, SIGNAL_AT = 150, 8
DEADLINE_S = 300  # for a start, a stop or a run; generous for a loaded machine
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def long_config(root: Path, parallel: str) -> Path:
    """test_ddp_train's 3t config, trained longer, checkpointed only at its last step."""
    path = write_config(root, write_table(root / "data"))
    config = yaml.safe_load(path.read_text())
    config["train"] |= {"steps": STEPS, "checkpoint_every": 1000, "log_every": 1}
    config["train"]["parallel"] = parallel
    path.write_text(yaml.safe_dump(config))
    return path


def command(config: Path, run: Path) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    train = ["-m", "threetowers", "train", str(config), "--run-dir", str(run), "--quiet"]
    return [*launch, f"--nproc_per_node={WORLD}", *train]


def run_to_the_end(config: Path, run: Path) -> None:
    done = subprocess.run(
        command(config, run), env=ENV, capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert done.returncode == 0, done.stderr[-3000:]


def logged_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").exists():
        return []
    return [record["step"] for record in train_records(run) if "loss" in record]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun starts each rank as its child)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])  # the fields after the name
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def rank_process(torchrun: int, rank: int) -> int:
    """The pid of torchrun's child with ``RANK=rank`` in its environment."""
    ranks = {}
    for pid in children(torchrun):
        try:
            variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for variable in variables:
            if variable.startswith(b"RANK="):
                ranks[int(variable[5:])] = pid
    assert sorted(ranks) == list(range(WORLD)), ranks
    return ranks[rank]


def end(job: subprocess.Popen) -> None:
    """A job the test left running: SIGTERM to torchrun, which passes it to the ranks; their
    pids SIGKILLed if that does not end them."""
    ranks = children(job.pid)
    job.terminate()
    try:
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in [*ranks, job.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait()


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def runs(tmp_path_factory, request) -> dict:
    """Under DDP (rank 0 writes the checkpoint) and FSDP (every rank writes its shard)."""
    root = tmp_path_factory.mktemp(f"sigterm-{request.param}")
    config = long_config(root, request.param)
    run_to_the_end(config, root / "straight")
    stopped = root / "stopped"
    with open(root / "out.txt", "w") as out, open(root / "err.txt", "w") as err:
        job = subprocess.Popen(command(config, stopped), env=ENV, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while not logged_steps(stopped) or logged_steps(stopped)[-1] < SIGNAL_AT:
                assert job.poll() is None, (root / "err.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, f"no step {SIGNAL_AT} in {DEADLINE_S} s"
                time.sleep(0.01)
            os.kill(rank_process(job.pid, 1), signal.SIGTERM)  # rank 1 only
            try:
                job.wait(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the job did not end within {DEADLINE_S} s of SIGTERM to rank 1")
        finally:
            if job.poll() is None:
                end(job)
    return {
        "config": config,
        "straight": root / "straight",
        "stopped": stopped,
        "returncode": job.returncode,
        "out": (root / "out.txt").read_text(),
        "err": (root / "err.txt").read_text(),
    }


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_checkpointed_with_exit_0(runs):
    stopped = runs["stopped"]
    assert runs["returncode"] == 0, runs["err"][-3000:]  # torchrun's: every rank exited 0
    steps = logged_steps(stopped)
    step = steps[-1]
    assert SIGNAL_AT <= step < STEPS
    assert steps == list(range(1, step + 1))
    # Rank 0, never signalled, stopped at the step rank 1's flag was agreed on, and saved it.
    assert runs["out"].strip() == (
        f"threetowers train: stopped by SIGTERM at step {step}; {stopped}/checkpoints/"
        f"step_{step:08d} saved; re-run the same command to resume"
    )
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [f"step_{step:08d}"]


def test_the_rerun_ends_with_the_uninterrupted_runs_weights_and_losses(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["stopped"], resumed)
    run_to_the_end(runs["config"], resumed)
    expected, got = weights(runs["straight"], STEPS), weights(resumed, STEPS)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    def losses(run: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in train_records(run) if "loss" in r]

    assert [step for step, *_ in losses(resumed)] == list(range(1, STEPS + 1))
    assert losses(resumed) == losses(runs["straight"])
