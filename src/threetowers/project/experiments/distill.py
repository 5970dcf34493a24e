"""``threetowers reproduce --experiment distill``: a large 3T teacher taught into small students.

The paper names 3T for distillation, from large models into small ones. Here a large 3T
teacher (the scaling experiment's L towers, EfficientNet-Lite0 as h, ``TEACHER_STEPS`` x the
config's steps, seed 0 only) is trained on the embedded world and exported with
``threetowers export --format open_clip`` (its image tower pools with a class token, its text
tower is causal and pools the end token: what OpenCLIP holds exactly). The export is then a
frozen pair ``t`` (``model.frozen``'s ``backbone: pair``) for students with the S towers,
everything else shared, ``STUDENT_STEPS`` x the config's steps, ``reproduce.seeds`` seeds:

- ``none``: CLIP;
- ``imagenet``: 3T with EfficientNet-Lite0 (h);
- ``pair``: 3T with the teacher pair (its two sides aligned with f and g at h's weights, and
  its similarities distilled into (z_f, z_g): the term ``fg_t``);
- ``both``: 3T with h and the teacher pair;
- ``distill``: the distillation term alone beside CLIP's (f_g and fg_t; the sides' weights 0).

Every run is tested (eval.json) and validated (eval_val.json). The teacher and the students
are reported as deployed, (z_f, z_g) (the export holds nothing else); for the 3T students
(``UNSWEPT`` aside) the mixture weights best on val are reported on test too.
``distill_report`` gives each student's share of the teacher - CLIP gap.

Sizing (2 CPU cores, ``reproduce.workers`` 2, one thread a run; the reproduce preset's 1300
steps), as ratios within one measurement (60-step runs side by side on an idle machine): a
teacher step costs 3.1-3.6x a student's, so the teacher at 5x (6500 steps) costs about seven
students at 2.5x (3250 steps). It trains beside the six students that need no teacher; the
nine pair students then share both workers: about the teacher and nine students in all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from threetowers.config import Config, ConfigError, FrozenTowerConfig, ModelConfig
from threetowers.errors import listed
from threetowers.files.readback import read_json
from threetowers.project.experiments.distill_report import METRICS, run_record, write_report
from threetowers.project.experiments.driver import run_experiment
from threetowers.project.experiments.jobs import Job
from threetowers.project.experiments.open_vocab import train_and_validate
from threetowers.project.experiments.reproduce import (
    RunSpec,
    prepare_data,
    shared_tokenizer,
    with_run,
    with_third,
)
from threetowers.project.experiments.scaling import TOWERS, resized, scaled_steps

TEACHER_TOWERS, STUDENT_TOWERS = "L", "S"
# x the config's steps: the teacher trains twice as long as a student (the sizing above)
TEACHER_STEPS, STUDENT_STEPS = 5.0, 2.5
TEACHER = RunSpec("teacher", "3t", 0)
PAIR = "t"  # the teacher pair's name in the students' model.frozen
LITE0 = {"backbone": "efficientnet_lite0", "path": None}  # h, at the config's h's size, weights
# setting -> the student's mode; ``student_frozen`` gives its frozen towers
STUDENTS = {"none": "clip", "imagenet": "3t", "pair": "3t", "both": "3t", "distill": "3t"}
READS_TEACHER = ("pair", "both", "distill")
# Evaluated without the mixture sweep: with h and the pair's three parts its grid has 1001
# weight vectors, whose evaluation took longer than the run's training, where the pair's own
# students have 286.
UNSWEPT = ("both",)


def plan(seeds: int) -> list[RunSpec]:
    """The teacher, then the students seed by seed (a stopped command has whole seeds)."""
    students = [RunSpec(s, method, seed) for seed in range(seeds) for s, method in STUDENTS.items()]
    return [TEACHER, *students]


def run_of(
    cfg: Config, spec: RunSpec, towers: str, steps: float, model: ModelConfig, out: Path
) -> Config:
    """Run ``spec``'s config: ``model`` with f and g at ``towers``' size of the config's
    (scaling's S, M, L), ``steps`` x the config's steps; checked as a whole, as its
    config.yaml will be read back."""
    image, text = (resized(t, *TOWERS[towers]) for t in (model.image, model.text))
    model = model.model_copy(update={"image": image, "text": text})
    train = cfg.train.model_copy(update={"steps": scaled_steps(cfg, steps)})
    run = with_run(cfg.model_copy(update={"train": train}), model, spec, out)
    return Config.model_validate(run.model_dump())


def teacher_config(cfg: Config, out: Path) -> Config:
    """The teacher: 3T with Lite0 at the L towers, made exportable to OpenCLIP (a class token
    beside gap pooling, a causal text tower pooling the end token); refused before any
    training if it still cannot be exported."""
    from threetowers.apps.export.open_clip import refusals

    model = with_third(cfg.model.model_copy(update={"mode": "3t"}), LITE0)
    exportable = {"class_token": True} if model.image.pool == "gap" else {}
    image = model.image.model_copy(update=exportable)
    text = model.text.model_copy(update={"causal": True, "pool": "eot"})
    model = model.model_copy(update={"image": image, "text": text})
    run = run_of(cfg, TEACHER, TEACHER_TOWERS, TEACHER_STEPS, model, out)
    reasons = refusals(run)
    if reasons:
        raise ConfigError(
            f"the distill experiment's teacher ({TEACHER_TOWERS} towers, exportable pooling) "
            f"cannot be exported to OpenCLIP:\n{listed(reasons)}"
        )
    return run


def export_dir(cfg: Config, out: Path) -> Path:
    """Where the teacher is exported: named by a digest of its config, so that the students
    reading it (whose configs hold the path) no longer match once the teacher changes."""
    teacher = teacher_config(cfg, out)
    settings = teacher.model_dump(mode="json", exclude={"train": {"run_dir"}})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return (out / f"teacher-open_clip-{digest}").resolve()


def student_frozen(cfg: Config, setting: str, teacher: Path) -> list[FrozenTowerConfig]:
    """The frozen towers of student ``setting``: h (Lite0) and the teacher pair, its sides
    aligned at h's weights (0 for ``distill``), its distillation term at weight 1."""
    (h,) = with_third(cfg.model, LITE0).frozen
    sides = {"f_weight": h.f_weight, "g_weight": h.g_weight}
    if setting == "distill":
        sides = {"f_weight": 0.0, "g_weight": 0.0}
    pair = FrozenTowerConfig(
        name=PAIR, backbone="pair", path=str(teacher), distill_weight=1.0, **sides
    )
    return {
        "none": [],
        "imagenet": [h],
        "pair": [pair],
        "both": [h, pair],
        "distill": [pair],
    }[setting]


def student_config(cfg: Config, spec: RunSpec, out: Path) -> Config:
    """A student: the S towers, its mode and frozen towers, the students' steps."""
    frozen = student_frozen(cfg, spec.setting, export_dir(cfg, out))
    model = cfg.model.model_copy(update={"mode": spec.method, "frozen": frozen})
    if spec.setting in UNSWEPT:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"alpha_sweep": False})})
    return run_of(cfg, spec, STUDENT_TOWERS, STUDENT_STEPS, model, out)


def run_config(cfg: Config, spec: RunSpec, out: Path) -> Config:
    return teacher_config(cfg, out) if spec == TEACHER else student_config(cfg, spec, out)


def export_teacher(teacher: Config, folder: Path) -> dict:
    """Export the trained teacher to ``folder`` unless it holds this very run already (the
    same fingerprint: a new export would only make the students' pair caches again)."""
    from threetowers.apps.export.open_clip import export_open_clip
    from threetowers.backbones.trained_pair import OPEN_CLIP_CONFIG
    from threetowers.model.trained import load_trained

    run = load_trained(teacher.train.run_dir, uses_frozen=False)  # its f and g
    written = folder / OPEN_CLIP_CONFIG
    if written.is_file() and read_json(written)["threetowers"]["fingerprint"] == run.fingerprint:
        return read_json(written)
    return export_open_clip(teacher.train.run_dir, folder)


def jobs(cfg: Config, out: Path) -> list[Job]:
    """The shared tokenizer and data, h's caches, the teacher and its export, the teacher
    pair's caches, then the students seed by seed: those that need no teacher start while
    it trains (the job runner takes the first job whose inputs are ready)."""
    clip = student_config(cfg, RunSpec("none", "clip", 0), out)  # trains the shared tokenizer
    cfg, tokenizer = shared_tokenizer(cfg, out)
    teacher = teacher_config(cfg, out)
    out_jobs = [
        Job("data:none", prepare_data, ([clip], tokenizer)),
        Job(
            "data:imagenet",
            prepare_data,
            ([teacher, student_config(cfg, RunSpec("imagenet", "3t", 0), out)],),
            ("data:none",),
        ),
        Job(TEACHER.name, train_and_validate, (teacher,), ("data:imagenet",)),
        Job("export:teacher", export_teacher, (teacher, export_dir(cfg, out)), (TEACHER.name,)),
    ]
    pair_student = student_config(cfg, RunSpec("pair", "3t", 0), out)
    out_jobs.append(Job("data:pair", prepare_data, ([pair_student],), ("export:teacher",)))
    for spec in plan(cfg.reproduce.seeds)[1:]:
        data = "data:pair" if spec.setting in READS_TEACHER else f"data:{spec.setting}"
        job = Job(spec.name, train_and_validate, (student_config(cfg, spec, out),), (data,))
        out_jobs.append(job)
    return out_jobs


def distill(cfg: Config, out: str | Path, progress: bool = True) -> dict:
    """Train, test and validate the teacher and every student; write the report to ``out``."""
    specs = {spec.name: spec for spec in plan(cfg.reproduce.seeds)}
    records = {}

    def describe(job: Job, result) -> str:
        if job.name == "export:teacher":
            return f"teacher exported (step {result['threetowers']['step']}) -> {job.args[1]}"
        if job.name not in specs:
            return f"{job.name} ready"
        spec = specs[job.name]
        records[job.name] = run_record(spec, Path(job.args[0].train.run_dir))
        return f"{job.name:<20} " + "  ".join(f"{k} {records[job.name][k]:5.1f}" for k in METRICS)

    out = Path(out)
    run_experiment(cfg, out, jobs, describe, "distill", progress)
    return write_report(out, cfg, [records[name] for name in specs])
