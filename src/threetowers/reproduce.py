"""``threetowers reproduce``: the paper's comparison of CLIP, LiT and 3T on the embedded world.

Three pretraining settings for the third tower (and LiT's image tower):

- ``matched``: a classifier pretrained here on the object-labelled set, whose labels are the
  zero-shot classes (the paper's JFT/ImageNet case);
- ``mismatched``: one pretrained on the fine scene labels, which ignore the objects (the
  Places365 case);
- ``imagenet``: the bundled ImageNet EfficientNet-Lite0.

Per seed, CLIP is trained once (it has no third tower) and LiT and 3T once per setting, all
from the same config, so data, steps, batch, towers and schedule are shared. Every run is an
ordinary run directory under ``OUT/runs``; re-running the command skips finished runs and
resumes an interrupted one from its last checkpoint. ``reproduce_report`` turns the runs
into ``results.json``, ``results.md`` and the figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from threetowers.config import Config
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


def classifier(cfg: Config, world_set: str, out: Path, progress: bool) -> tuple[Path, dict]:
    """Pretrain the classifier on ``world_set`` into ``out/classifiers`` (reused when its
    pretraining config is unchanged); returns its path and report."""
    path = out / "classifiers" / f"{world_set}.safetensors"
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
            return path, report
    pretrain(cfg.model_copy(update={"pretrain": settings}), progress=progress)
    report = json.loads(report_path.read_text()) | {"pretrain": wanted}
    report_path.write_text(json.dumps(report, indent=1))
    return path, report


def run_config(cfg: Config, spec: RunSpec, out: Path, classifiers: dict[str, Path]) -> Config:
    """``cfg`` for one run: its mode, third tower, seed and run directory."""
    model = cfg.model.model_copy(update={"mode": spec.method})
    if spec.setting in classifiers:
        third = model.third.model_copy(
            update={"backbone": "checkpoint", "path": str(classifiers[spec.setting].resolve())}
        )
        model = model.model_copy(update={"third": third})
    elif spec.setting == "imagenet":
        third = model.third.model_copy(update={"backbone": "efficientnet_lite0", "path": None})
        model = model.model_copy(update={"third": third})
    run_dir = out / "runs" / spec.name
    train_cfg = cfg.train.model_copy(update={"seed": spec.seed, "run_dir": str(run_dir)})
    return cfg.model_copy(update={"model": model, "train": train_cfg})


def reproduce(cfg: Config, out: str | Path, progress: bool = True) -> dict:
    """Pretrain, train and evaluate every run of ``cfg.reproduce``; write the report to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    settings = cfg.reproduce.settings
    runs = plan(settings, cfg.reproduce.seeds)
    pretrained = [s for s in settings if PRETRAINING_SETS[s] is not None]
    bar = tqdm(
        total=len(pretrained) + len(runs), disable=not progress, unit="job", desc="reproduce"
    )
    classifiers, reports = {}, {}
    for setting in pretrained:
        started = time.perf_counter()
        classifiers[setting], reports[setting] = classifier(
            cfg, PRETRAINING_SETS[setting], out, progress=False
        )
        bar.write(
            f"classifier {setting:<10} ({reports[setting]['classes']} classes): val top-1 "
            f"{reports[setting]['val_top1']:.1f}%  [{time.perf_counter() - started:.0f} s]"
        )
        bar.update(1)
    records = []
    for spec in runs:
        started = time.perf_counter()
        run_cfg = run_config(cfg, spec, out, classifiers)
        run_dir = Path(run_cfg.train.run_dir)
        if evaluated_step(run_dir) != run_cfg.train.steps:
            train(run_cfg, progress=False)
        record = run_record(spec.setting, spec.method, spec.seed, run_dir)
        records.append(record)
        headline = "  ".join(f"{k} {record[k]:5.1f}" for k in HEADLINE)
        bar.write(f"{spec.name:<28} {headline}  [{time.perf_counter() - started:.0f} s]")
        bar.update(1)
    bar.close()
    return write_report(out, cfg, records, reports)
