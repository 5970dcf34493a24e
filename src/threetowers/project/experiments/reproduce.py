"""``threetowers reproduce``: the paper's comparison of CLIP, LiT and 3T on the embedded world.

Three pretraining settings for the third tower (and LiT's image tower):

- ``matched``: a classifier pretrained here on the object-labelled set, whose labels are the
  zero-shot classes (the paper's JFT/ImageNet case);
- ``mismatched``: one pretrained on the fine scene labels, which ignore the objects (the
  Places365 case);
- ``imagenet``: the bundled ImageNet EfficientNet-Lite0.

Per seed, CLIP is trained once (it has no third tower) and LiT and 3T once per setting, all
from the same config, so data, steps, batch, towers, tokenizer and schedule are shared. The
classifiers, the shared caches and the runs are jobs (``jobs.run_jobs``) on
``reproduce.workers`` processes. Every run is an ordinary run directory under ``OUT/runs``;
re-running the command skips finished runs and resumes an interrupted one from its last
checkpoint. ``reproduce_report`` turns the runs into ``results.json``, ``results.md`` and
the figures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from threetowers.config import Config, ExperimentConfig, ModelConfig
from threetowers.data.pipeline import TrainingData, open_data
from threetowers.files.readback import read_json
from threetowers.model.build import build_model
from threetowers.project.experiments.driver import run_experiment
from threetowers.project.experiments.jobs import Job
from threetowers.project.experiments.pretrain import pretrain
from threetowers.project.experiments.report import HEADLINE, run_record, write_report
from threetowers.project.world.default import default_world
from threetowers.project.world.spec import VERSION as WORLD_VERSION
from threetowers.trainer.loop import evaluated_step, train
from threetowers.trainer.run_dir import same_config
from threetowers.trainer.start import towers_of

# setting -> the world's labelled set its classifier is pretrained on (None: bundled ImageNet)
PRETRAINING_SETS = {"matched": "objects", "mismatched": "scenes", "imagenet": None}


@dataclass(frozen=True)
class RunSpec:
    setting: str  # "none" for clip
    method: str  # clip, lit or 3t
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}-{self.method}-seed{self.seed}"


def plan(settings: list[str], seeds: int) -> list[RunSpec]:
    """Every run, seed by seed, so that a stopped command has whole seeds to report."""
    runs = []
    for seed in range(seeds):
        runs.append(RunSpec("none", "clip", seed))
        runs += [RunSpec(setting, method, seed) for setting in settings for method in ("lit", "3t")]
    return runs


def quick(cfg: ExperimentConfig) -> ExperimentConfig:
    """The --quick variant: one seed, ``quick_steps`` of training, shorter pretraining."""
    r = cfg.reproduce
    return cfg.model_copy(
        update={
            "train": cfg.train.model_copy(
                update={
                    "steps": r.quick_steps,
                    "warmup_steps": min(cfg.train.warmup_steps, r.quick_steps // 10),
                }
            ),
            "pretrain": cfg.pretrain.model_copy(
                update={
                    "steps": r.quick_pretrain_steps,
                    "warmup_steps": min(cfg.pretrain.warmup_steps, r.quick_pretrain_steps // 10),
                }
            ),
            "reproduce": r.model_copy(update={"seeds": 1}),
        }
    )


def classifier_inputs(cfg: ExperimentConfig, world_set: str) -> dict:
    """What a classifier depends on: its pretraining settings, the seed and the world,
    including the world's content version (not where the classifier is written)."""
    settings = cfg.pretrain.model_dump(mode="json", exclude={"out"}) | {"world_set": world_set}
    return settings | {
        "seed": cfg.train.seed,
        "world": cfg.data.world.model_dump(mode="json") | {"version": WORLD_VERSION},
    }


def classifier_path(cfg: ExperimentConfig, out: Path, setting: str) -> Path:
    """Named after a hash of the classifier's inputs, so that the runs reading it (whose
    configs hold the path) no longer match once those inputs change."""
    world_set = PRETRAINING_SETS[setting]
    inputs = json.dumps(classifier_inputs(cfg, world_set), sort_keys=True).encode()
    digest = hashlib.sha256(inputs).hexdigest()[:12]
    return out / "classifiers" / f"{world_set}-{digest}.safetensors"


def classifier(cfg: ExperimentConfig, world_set: str, path: Path) -> dict:
    """Pretrain the classifier on ``world_set`` to ``path`` unless it is there (its name
    says what it was made from); returns its report."""
    report_path = path.with_suffix(".json")
    if path.exists() and report_path.exists():
        return read_json(report_path)
    settings = cfg.pretrain.model_copy(update={"world_set": world_set, "out": str(path)})
    pretrain(cfg.model_copy(update={"pretrain": settings}), progress=False)
    return read_json(report_path)


def prepare_data(configs: list[Config], tokenizer_out: Path | None = None) -> None:
    """Build what the runs of ``configs`` read and share (h's feature cache, the preloaded
    pixels or captions) once, through the trainer's own code path, before several runs in
    parallel would each build it; with ``tokenizer_out``, save the tokenizer there."""
    for cfg in configs:
        with tempfile.TemporaryDirectory() as scratch:  # the run directory it asks for
            opened = open_data(cfg, Path(scratch), default_world(cfg))
            data = TrainingData(cfg, opened, towers_of(build_model(cfg)), progress=False)
            if tokenizer_out is not None:
                data.tokenizer.save(tokenizer_out)


def train_run(cfg: Config) -> None:
    """Train and evaluate one run, unless it is finished (a partial one resumes). A run made
    with another config (other settings, or a retrained classifier) is stale: it is removed
    and trained again, as the command owns ``OUT/runs``."""
    run_dir = Path(cfg.train.run_dir)
    if (run_dir / "config.yaml").exists() and not same_config(cfg, run_dir):
        shutil.rmtree(run_dir)
    if evaluated_step(run_dir) != cfg.train.steps:
        train(cfg, progress=False)


def run_config(cfg: ExperimentConfig, spec: RunSpec, out: Path) -> Config:
    """``cfg`` for one run: its mode, third tower, seed and run directory."""
    model = cfg.model.model_copy(update={"mode": spec.method})
    if PRETRAINING_SETS.get(spec.setting) is not None:  # a classifier pretrained here
        path = classifier_path(cfg, out, spec.setting).resolve()
        model = with_third(model, {"backbone": "checkpoint", "path": str(path)})
    elif spec.setting == "imagenet":
        model = with_third(model, {"backbone": "efficientnet_lite0", "path": None})
    return with_run(cfg, model, spec, out)


def with_third(model: ModelConfig, update: dict) -> ModelConfig:
    """``model`` with its one frozen tower (the third, h) updated."""
    (third,) = model.frozen
    return model.model_copy(update={"frozen": [third.model_copy(update=update)]})


def with_run(cfg: ExperimentConfig, model: ModelConfig, spec: RunSpec, out: Path) -> Config:
    """The training config of ``cfg`` with ``model``, the run's seed and its directory
    ``OUT/runs/NAME``: the grid's own sections do not change a run (its classifier's path
    does), so more seeds or another classifier redo only what they must."""
    run_dir = out / "runs" / spec.name
    train_cfg = cfg.train.model_copy(update={"seed": spec.seed, "run_dir": str(run_dir)})
    return cfg.training_config().model_copy(update={"model": model, "train": train_cfg})


def shared_tokenizer(cfg: ExperimentConfig, out: Path) -> tuple[ExperimentConfig, Path | None]:
    """One tokenizer for every run (the same captions would train the same one each time):
    ``cfg`` reading ``OUT/tokenizer.json``, which the first data job writes, and that path;
    a tokenizer the config names is used as it is (None)."""
    if cfg.data.tokenizer is not None:
        return cfg, None
    tokenizer = out / "tokenizer.json"
    shared = cfg.data.model_copy(update={"tokenizer": str(tokenizer.resolve())})
    return cfg.model_copy(update={"data": shared}), tokenizer


def jobs(cfg: ExperimentConfig, out: Path) -> list[Job]:
    """The shared tokenizer and data, the classifiers, then the runs seed by seed (the list
    order is the priority: seed 0 completes first, so a stopped command has whole seeds to
    report)."""
    settings = cfg.reproduce.settings
    clip = run_config(cfg, RunSpec("none", "clip", 0), out)  # trains the shared tokenizer
    cfg, tokenizer = shared_tokenizer(cfg, out)
    out_jobs = [Job("data:none", prepare_data, ([clip], tokenizer))]
    for setting in settings:
        after: tuple[str, ...] = ("data:none",)
        if PRETRAINING_SETS[setting] is not None:
            path = classifier_path(cfg, out, setting)
            out_jobs.append(
                Job(f"classifier:{setting}", classifier, (cfg, PRETRAINING_SETS[setting], path))
            )
            after += (f"classifier:{setting}",)
        configs = [run_config(cfg, RunSpec(setting, method, 0), out) for method in ("lit", "3t")]
        out_jobs.append(Job(f"data:{setting}", prepare_data, (configs,), after))
    for spec in plan(settings, cfg.reproduce.seeds):
        out_jobs.append(
            Job(spec.name, train_run, (run_config(cfg, spec, out),), (f"data:{spec.setting}",))
        )
    return out_jobs


def reproduce(cfg: ExperimentConfig, out: str | Path, progress: bool = True) -> dict:
    """Pretrain, train and evaluate every run of ``cfg.reproduce``; write the report to ``out``."""
    specs = {spec.name: spec for spec in plan(cfg.reproduce.settings, cfg.reproduce.seeds)}
    reports, records = {}, {}

    def describe(job: Job, result) -> str:
        if job.name.startswith("classifier:"):
            setting = job.name.split(":")[1]
            reports[setting] = result
            line = f"classifier {setting} ({result['classes']} classes): val top-1 "
            return line + f"{result['val_top1']:.1f}%"
        if job.name in specs:
            spec = specs[job.name]
            run_dir = Path(job.args[0].train.run_dir)
            records[job.name] = run_record(spec.setting, spec.method, spec.seed, run_dir)
            return f"{job.name:<28} " + "  ".join(
                f"{k} {records[job.name][k]:5.1f}" for k in HEADLINE
            )
        return f"{job.name} ready"

    out = Path(out)
    run_experiment(cfg, out, jobs, describe, "reproduce", progress)
    ordered = [records[name] for name in specs]
    return write_report(out, cfg, ordered, reports)
