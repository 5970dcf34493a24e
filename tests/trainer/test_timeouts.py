"""Under ``torchrun --nproc_per_node 2`` with the training process group's timeout shrunk to
seconds (``short_timeouts.py``): an evaluation and a checkpoint longer than that timeout wait
outside the training collectives and the run completes, while a rank hung in a step fails the
job within the timeout, not after the hang; rank 0's validation (eval.val_data) runs alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.trainer.test_ddp_train import STEPS, WORLD, train_records, write_config, write_table
from threetowers.config import load_config
from threetowers.trainer.loop import train

SHORT_TIMEOUTS = Path(__file__).with_name("short_timeouts.py")
TIMEOUT_S = 3  # the training collectives' timeout in these runs
SLOW_S = 10  # rank 0's slow evaluation, its slow checkpoint: each past TIMEOUT_S
HANG_S = 600  # rank 1 hung in a step, as long as the usual training timeout
DEADLINE_S = 300  # for a whole job; generous for a loaded machine
# gloo's words when a collective outlives the process group's timeout, said by rank 0
TIMED_OUT = re.compile(rf"\[rank0\]: RuntimeError: .*Timed out waiting {TIMEOUT_S * 1000}ms")


def config(root: Path, validated: bool = False) -> Path:
    """test_ddp_train's 3t config (checkpoints at steps 3 and 6), evaluated at step 3 too;
    ``validated``: with its own table as eval.val_data."""
    table = write_table(root / "data")
    path = write_config(root, table)
    settings = yaml.safe_load(path.read_text())
    settings["eval"] = {"every": 3} | ({"val_data": str(table)} if validated else {})
    path.write_text(yaml.safe_dump(settings))
    return path


def launch(config: Path, run: Path, **env: str) -> tuple[int, str, float]:
    """torchrun of the command with short timeouts: its exit status, stderr and seconds.
    The job runs in a session of its own, whatever is left of which is killed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={WORLD}", str(SHORT_TIMEOUTS), "train", str(config)]
    command += ["--run-dir", str(run), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAINING_TIMEOUT_S=str(TIMEOUT_S), **env)
    err = run.with_name(f"{run.name}-stderr.txt")
    begun = time.monotonic()
    with open(err, "w") as stderr:
        job = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        try:
            job.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end in {DEADLINE_S} s")
        finally:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:  # nothing left
                pass
            job.wait()
    return job.returncode, err.read_text(), time.monotonic() - begun


def test_a_slow_evaluation_and_checkpoint_wait_outside_the_training_timeout(tmp_path):
    run = tmp_path / "slow"
    slow = {"SLOW_EVALUATION_S": str(SLOW_S), "SLOW_CHECKPOINT_S": str(SLOW_S)}
    returncode, stderr, seconds = launch(config(tmp_path), run, **slow)
    assert returncode == 0, stderr[-3000:]
    assert seconds > 2 * SLOW_S  # rank 0 did take that long at step 3
    records = train_records(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "eval" in r] == [3, STEPS]
    for step in (3, STEPS):
        assert (run / "checkpoints" / f"step_{step:08d}" / "model.safetensors").is_file()


def test_a_rank_hung_in_a_step_fails_the_job_within_the_training_timeout(tmp_path):
    run = tmp_path / "hung"
    hang = {"HANG_AT_STEP": "4", "HANG_S": str(HANG_S)}
    returncode, stderr, seconds = launch(config(tmp_path), run, **hang)
    assert returncode != 0
    assert TIMED_OUT.search(stderr), stderr[-3000:]
    # rank 0 fails TIMEOUT_S after the hang begins; torchrun then gives the hung rank 30 s
    # to end on SIGTERM (the loop's handler only flags a stop) before its SIGKILL
    assert seconds < HANG_S / 5
    assert [r["step"] for r in train_records(run) if "loss" in r] == [1, 2, 3]


def test_rank_0_validates_alone_while_the_others_wait(tmp_path):
    validated = config(tmp_path, validated=True)
    returncode, stderr, _ = launch(validated, tmp_path / "ranks")
    assert returncode == 0, stderr[-3000:]
    single = train(load_config(validated), tmp_path / "single", progress=False)

    def validation_losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["eval"]["val_loss"] for r in train_records(run) if "eval" in r}

    # the weights of the two runs agree to 1e-4 (test_ddp_train), their val_loss so closely
    expected, got = validation_losses(single), validation_losses(tmp_path / "ranks")
    assert list(got) == [3, STEPS]
    assert got == pytest.approx(expected, rel=1e-3)
