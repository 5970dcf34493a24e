"""What every experiment command does around its own runs: its config beside them, the
world made once before any worker needs it, the jobs run with a progress bar and one line
per finished job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from threetowers.config import Config
from threetowers.project.experiments.jobs import Job, run_jobs
from threetowers.project.world.default import ensure_world


def run_experiment(
    cfg: Config,
    out: Path,
    make_jobs: Callable[[Config, Path], list[Job]],
    describe: Callable[[Job, Any], str],
    name: str,
    progress: bool = True,
) -> list[Job]:
    """Run ``make_jobs(cfg, out)`` on ``cfg.reproduce.workers`` processes; ``describe``
    gives the line printed when a job finishes (its result at hand). Returns the jobs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ensure_world(cfg.data.world)
    todo = make_jobs(cfg, out)
    bar = tqdm(total=len(todo), disable=not progress, unit="job", desc=name)

    def done(job: Job, result, seconds: float) -> None:
        bar.write(f"{describe(job, result)}  [{seconds:.0f} s]")
        bar.update(1)

    run_jobs(todo, cfg.reproduce.workers, done)
    bar.close()
    return todo
