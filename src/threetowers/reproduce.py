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

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from threetowers.atomic import write_atomic
from threetowers.build import build_model
from threetowers.config import Config
from threetowers.data.pipeline import TrainingData, ensure_world
from threetowers.jobs import Job, run_jobs
from threetowers.pretrain import pretrain
from threetowers.reproduce_report import HEADLINE, run_record, write_report
from threetowers.train import evaluated_step, train

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


def quick(cfg: Config) -> Config:
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


def classifier_path(out: Path, setting: str) -> Path:
    return out / "classifiers" / f"{PRETRAINING_SETS[setting]}.safetensors"


def classifier(cfg: Config, world_set: str, path: Path) -> dict:
    """Pretrain the classifier on ``world_set`` to ``path`` unless the one there was made
    with the same pretraining config; returns its report."""
    settings = cfg.pretrain.model_copy(update={"world_set": world_set, "out": str(path)})
    # what the classifier depends on (not where it is written), so a copied one is reused
    wanted = settings.model_dump(mode="json", exclude={"out"}) | {
        "seed": cfg.train.seed,
        "world": cfg.data.world.model_dump(mode="json"),
    }
    report_path = path.with_suffix(".json")
    if path.exists() and report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("pretrain") == wanted:
            return report
    pretrain(cfg.model_copy(update={"pretrain": settings}), progress=False)
    report = json.loads(report_path.read_text()) | {"pretrain": wanted}
    write_atomic(report_path, json.dumps(report, indent=1))
    return report


def prepare_data(configs: list[Config], tokenizer_out: Path | None = None) -> None:
    """Build what the runs of ``configs`` read and share (h's feature cache, the preloaded
    pixels or captions) once, through the trainer's own code path, before several runs in
    parallel would each build it; with ``tokenizer_out``, save the tokenizer there."""
    for cfg in configs:
        with tempfile.TemporaryDirectory() as scratch:  # the run directory it asks for
            data = TrainingData(cfg, Path(scratch))
            data.attach(build_model(cfg), progress=False)
            if tokenizer_out is not None:
                data.tokenizer.save(tokenizer_out)


def train_run(cfg: Config) -> None:
    """Train and evaluate one run, unless it is finished (a partial one resumes)."""
    if evaluated_step(Path(cfg.train.run_dir)) != cfg.train.steps:
        train(cfg, progress=False)


def run_config(cfg: Config, spec: RunSpec, out: Path) -> Config:
    """``cfg`` for one run: its mode, third tower, seed and run directory."""
    model = cfg.model.model_copy(update={"mode": spec.method})
    if PRETRAINING_SETS.get(spec.setting) is not None:  # a classifier pretrained here
        path = classifier_path(out, spec.setting).resolve()
        third = model.third.model_copy(update={"backbone": "checkpoint", "path": str(path)})
        model = model.model_copy(update={"third": third})
    elif spec.setting == "imagenet":
        third = model.third.model_copy(update={"backbone": "efficientnet_lite0", "path": None})
        model = model.model_copy(update={"third": third})
    run_dir = out / "runs" / spec.name
    train_cfg = cfg.train.model_copy(update={"seed": spec.seed, "run_dir": str(run_dir)})
    return cfg.model_copy(update={"model": model, "train": train_cfg})


def jobs(cfg: Config, out: Path) -> list[Job]:
    """The shared tokenizer and data, the classifiers, then the runs seed by seed (the list
    order is the priority: seed 0 completes first, so a stopped command has whole seeds to
    report)."""
    settings = cfg.reproduce.settings
    clip = run_config(cfg, RunSpec("none", "clip", 0), out)
    # One tokenizer for every run: the same captions would train the same one each time.
    tokenizer = None
    if cfg.data.tokenizer is None:
        tokenizer = out / "tokenizer.json"  # trained by the first data job, read by the rest
        shared = cfg.data.model_copy(update={"tokenizer": str(tokenizer.resolve())})
        cfg = cfg.model_copy(update={"data": shared})
    out_jobs = [Job("data:none", prepare_data, ([clip], tokenizer))]
    for setting in settings:
        after: tuple[str, ...] = ("data:none",)
        if PRETRAINING_SETS[setting] is not None:
            path = classifier_path(out, setting)
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


def reproduce(cfg: Config, out: str | Path, progress: bool = True) -> dict:
    """Pretrain, train and evaluate every run of ``cfg.reproduce``; write the report to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ensure_world(cfg.data.world)  # once, here, before any worker needs it
    todo = jobs(cfg, out)
    specs = {spec.name: spec for spec in plan(cfg.reproduce.settings, cfg.reproduce.seeds)}
    bar = tqdm(total=len(todo), disable=not progress, unit="job", desc="reproduce")
    reports, records = {}, {}

    def done(job: Job, result, seconds: float) -> None:
        if job.name.startswith("classifier:"):
            setting = job.name.split(":")[1]
            reports[setting] = result
            line = f"classifier {setting} ({result['classes']} classes): val top-1 "
            line += f"{result['val_top1']:.1f}%"
        elif job.name in specs:
            spec = specs[job.name]
            run_dir = Path(job.args[0].train.run_dir)
            records[job.name] = run_record(spec.setting, spec.method, spec.seed, run_dir)
            line = f"{job.name:<28} " + "  ".join(
                f"{k} {records[job.name][k]:5.1f}" for k in HEADLINE
            )
        else:
            line = f"{job.name} ready"
        bar.write(f"{line}  [{seconds:.0f} s]")
        bar.update(1)

    run_jobs(todo, cfg.reproduce.workers, done)
    bar.close()
    ordered = [records[name] for name in specs]
    return write_report(out, cfg, ordered, reports)
