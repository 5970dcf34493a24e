"""``run_jobs``: dependencies honoured in and out of process, thread limits, failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from threetowers.project.experiments.jobs import Job, available_cores, run_jobs


def append(path: Path, text: str) -> str:
    """Append ``text`` to ``path``; return what the file held before."""
    before = path.read_text() if path.exists() else ""
    path.write_text(before + text)
    return before


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def fail(message: str) -> None:
    raise RuntimeError(message)


@pytest.mark.parametrize("workers", [1, 2])
def test_each_job_starts_after_the_jobs_it_waits_for(tmp_path, workers):
    log = tmp_path / "log"
    jobs = [
        Job("a", append, (log, "a")),
        Job("b", append, (log, "b"), after=("a",)),
        Job("c", append, (log, "c"), after=("b",)),
    ]
    finished = []
    results = run_jobs(jobs, workers, lambda job, result, seconds: finished.append(job.name))
    assert results == {"a": "", "b": "a", "c": "ab"}  # each saw its predecessors' writes
    assert finished == ["a", "b", "c"] and log.read_text() == "abc"


def test_workers_get_their_share_of_the_cores():
    jobs = [Job(f"threads{i}", torch_threads) for i in range(2)]
    results = run_jobs(jobs, 2, lambda *_: None)
    assert set(results.values()) == {max(1, available_cores() // 2)}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_raises_its_own_error(workers):
    jobs = [Job("ok", torch_threads), Job("bad", fail, ("the data is gone",))]
    with pytest.raises(RuntimeError, match="the data is gone"):
        run_jobs(jobs, workers, lambda *_: None)


def test_dependencies_must_be_listed_before_their_dependents():
    with pytest.raises(ValueError, match="'b' waits for \\['a'\\], not listed before it"):
        run_jobs([Job("b", torch_threads, after=("a",)), Job("a", torch_threads)], 1, print)
    with pytest.raises(ValueError, match="unique"):
        run_jobs([Job("a", torch_threads), Job("a", torch_threads)], 1, print)
