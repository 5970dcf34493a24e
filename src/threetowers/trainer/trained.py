"""Evaluate a trained run (read by ``model/trained.py``) on a config's benchmarks."""

from __future__ import annotations

from pathlib import Path

from threetowers.config import Config
from threetowers.model.trained import TrainedRun


def evaluate_trained(run: TrainedRun, cfg: Config, out_dir: Path | None) -> tuple[dict, dict]:
    """``run``'s model on the benchmarks of ``cfg`` (the run's config, perhaps with other
    eval.* settings): its metrics (eval.json in ``out_dir`` when given) and the chance levels."""
    from threetowers.evaluation.benchmark_sets import resolve_benchmarks
    from threetowers.evaluation.chance import chance_levels
    from threetowers.evaluation.inputs import EvalCache
    from threetowers.evaluation.suite import evaluate_model
    from threetowers.project.world.default import default_world

    world = default_world(cfg)
    defaults = None if world is None else world["benchmarks"]
    benchmarks = resolve_benchmarks(cfg.eval, defaults, cfg.data.allow_absolute_paths)
    results = evaluate_model(
        run.model,
        run.tokenizer,
        benchmarks,
        cfg.eval,
        out_dir,
        step=run.step,
        max_bad_fraction=cfg.data.max_bad_fraction,
        cache=EvalCache.of(cfg.data),
        num_workers=cfg.data.num_workers,
    )
    return results, chance_levels(benchmarks)
