"""``threetowers reproduce --experiment open-vocab``: queries in words no caption used.

A text tower trained from scratch knows only the words of its captions; a frozen pretrained
text tower t (MiniLM) knows English. 3T with t aligns f's head f->t with t's sentence
embeddings of the captions, so the pair (f->t, t) can score an image against any query. The
experiment measures whether it does, on the world's held-out-word sets
(``project/world/heldout.py``) and on its ordinary test sets:

- CLIP;
- 3T with the ImageNet tower (EfficientNet-Lite0, ``inet``);
- 3T with MiniLM (``minilm``);
- 3T with both.

Every run shares the reproduce preset, so only the frozen towers differ. For each 3T run the
convex combination's weights are chosen per metric on the validation splits (``eval_val.json``)
and reported on the test splits (``eval.json``), next to the run's own towers (f, g).
"""

from __future__ import annotations

import json
from pathlib import Path

from threetowers.config import Config, FrozenTowerConfig
from threetowers.files.atomic import write_atomic
from threetowers.files.readback import read_json
from threetowers.model.trained import load_trained
from threetowers.project.experiments.driver import run_experiment
from threetowers.project.experiments.jobs import Job
from threetowers.project.experiments.report import METHOD_NAMES, chosen_on_val, compare, spread
from threetowers.project.experiments.reproduce import (
    RunSpec,
    prepare_data,
    shared_tokenizer,
    train_run,
    with_run,
)
from threetowers.trainer.trained import evaluate_trained

INET = FrozenTowerConfig(name="inet", backbone="efficientnet_lite0", image_size=64)
MINILM = FrozenTowerConfig(name="minilm", backbone="minilm")
# setting -> the 3T run's frozen towers
SETTINGS = {"imagenet": [INET], "minilm": [MINILM], "both": [INET, MINILM]}
HELDOUT = ("zeroshot_heldout_top1", "i2t_heldout_R@1", "t2i_heldout_R@1")
ORDINARY = ("zeroshot_top1", "i2t_R@1", "t2i_R@1")
METRICS = HELDOUT + ORDINARY
LABELS = {
    "zeroshot_heldout_top1": "held-out zero-shot top-1",
    "i2t_heldout_R@1": "held-out image→text R@1",
    "t2i_heldout_R@1": "held-out text→image R@1",
    "zeroshot_top1": "zero-shot top-1",
    "i2t_R@1": "image→text R@1",
    "t2i_R@1": "text→image R@1",
}
SETTING_NAMES = {"none": "", "imagenet": "ImageNet", "minilm": "MiniLM", "both": "both"}


def plan(seeds: int) -> list[RunSpec]:
    """Seed by seed: CLIP, then 3T with each setting's towers."""
    return [
        spec
        for seed in range(seeds)
        for spec in [RunSpec("none", "clip", seed)]
        + [RunSpec(setting, "3t", seed) for setting in SETTINGS]
    ]


def run_config(cfg: Config, spec: RunSpec, out: Path) -> Config:
    # Each tower's terms weigh what the config's frozen tower's do (the preset's h)
    base = next(iter(cfg.model.frozen), FrozenTowerConfig())
    weights = {"f_weight": base.f_weight, "g_weight": base.g_weight}
    frozen = [tower.model_copy(update=weights) for tower in SETTINGS.get(spec.setting, [])]
    model = cfg.model.model_copy(update={"mode": spec.method, "frozen": frozen})
    return with_run(cfg, model, spec, out)


def train_and_validate(cfg: Config) -> None:
    """Train and test the run (eval.json), then evaluate it on the validation splits
    (eval_val.json), where its weights are chosen; each step is skipped once done."""
    train_run(cfg)
    run_dir = Path(cfg.train.run_dir)
    run = load_trained(run_dir)
    path = run_dir / "eval_val.json"
    if path.is_file() and read_json(path).get("step") == run.step:
        return
    # No few-shot probe: on val its shots would be drawn from the images it is scored on.
    val = cfg.eval.model_copy(
        update={"retrieval_split": "val", "zeroshot_split": "val", "fewshot_shots": 0}
    )
    results, _ = evaluate_trained(run, cfg.model_copy(update={"eval": val}), None)
    write_atomic(path, json.dumps(results, indent=1))


def jobs(cfg: Config, out: Path) -> list[Job]:
    """The shared tokenizer and data, each setting's caches, then the runs seed by seed."""
    clip = run_config(cfg, RunSpec("none", "clip", 0), out)  # trains the shared tokenizer
    cfg, tokenizer = shared_tokenizer(cfg, out)
    out_jobs = [Job("data:none", prepare_data, ([clip], tokenizer))]
    names = {setting: {tower.name for tower in towers} for setting, towers in SETTINGS.items()}
    for setting in SETTINGS:
        first = run_config(cfg, RunSpec(setting, "3t", 0), out)
        # A setting whose towers an earlier one caches waits for it, not to cache them twice.
        after = ["data:none"] + [f"data:{o}" for o in SETTINGS if names[o] < names[setting]]
        out_jobs.append(Job(f"data:{setting}", prepare_data, ([first],), tuple(after)))
    for spec in plan(cfg.reproduce.seeds):
        run = run_config(cfg, spec, out)
        out_jobs.append(Job(spec.name, train_and_validate, (run,), (f"data:{spec.setting}",)))
    return out_jobs


# ------------------------------------------------------------------------ report
def run_record(spec: RunSpec, run_dir: Path) -> dict:
    """One run's entry of results.json: the grid's schema (setting, method, seed, metrics),
    and for 3T the weights chosen on val."""
    test = read_json(run_dir / "eval.json")
    record = {"setting": spec.setting, "method": spec.method, "seed": spec.seed}
    record |= {"run_dir": str(run_dir)} | {k: test[k] for k in METRICS}
    if spec.method == "3t":
        val = read_json(run_dir / "eval_val.json")
        towers = [tower.name for tower in SETTINGS[spec.setting]]
        record["best_alpha"] = chosen_on_val(test, val, tuple(towers), METRICS)
    return record


def rows(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, per-seed metrics) for each line of the table: CLIP, then each 3T setting at
    its own towers (f, g) and at the weights chosen on val."""
    out = []
    for setting in ("none", *SETTINGS):
        runs = [r for r in records if r["setting"] == setting]
        if not runs:
            continue
        name = METHOD_NAMES[runs[0]["method"]]
        if setting == "none":
            out.append((name, [{k: r[k] for k in METRICS} for r in runs]))
            continue
        label = f"{name} + {SETTING_NAMES[setting]}"
        out.append((f"{label}, (f, g)", [{k: r[k] for k in METRICS} for r in runs]))
        chosen = [{k: r["best_alpha"][k]["test"] for k in METRICS} for r in runs]
        out.append((f"{label}, weights chosen on val", chosen))
    return out


def summary(records: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    return {
        label: {k: spread([run[k] for run in runs]) for k in METRICS}
        for label, runs in rows(records)
    }


def findings(table: dict) -> list[dict]:
    """The experiment's questions, each answered with the tie rule of the grid's report:
    "holds" when the comparison comes out as asked, "tie" within the seed spreads."""
    checks = []

    def check(question: str, a: str, b: str, metric: str, ties_hold: bool = False) -> None:
        if a not in table or b not in table:
            return
        left, right = table[a][metric], table[b][metric]
        result = compare(left, right)
        status = "holds" if result == ">" or (ties_hold and result == "tie") else result
        checks.append(
            {
                "question": question,
                "metric": metric,
                "status": {"<": "fails"}.get(status, status),
                "detail": f"{a} {left[0]:.1f} ± {left[1]:.1f} vs {b} {right[0]:.1f} ± "
                f"{right[1]:.1f}",
            }
        )

    clip = "CLIP"
    text = "3T + MiniLM, weights chosen on val"
    both = "3T + both, weights chosen on val"
    inet = "3T + ImageNet, weights chosen on val"
    for metric in HELDOUT:
        check("MiniLM answers held-out words better than CLIP", text, clip, metric)
        check("MiniLM answers them better than the ImageNet tower", text, inet, metric)
        check("adding MiniLM to the ImageNet tower answers them better", both, inet, metric)
    for metric in ORDINARY:
        question = "MiniLM does not hurt the ordinary sets"
        check(f"{question} (3T + MiniLM vs CLIP)", text, clip, metric, ties_hold=True)
        check(f"{question} (3T + both vs 3T + ImageNet)", both, inet, metric, ties_hold=True)
    return checks


def markdown(table: dict, checks: list[dict], chance: dict[str, float]) -> str:
    header = "| run | " + " | ".join(LABELS[k] for k in METRICS) + " |"
    lines = [
        "# Open vocabulary: queries in words no training caption used",
        "",
        "Mean ± standard deviation over seeds (%, test splits). Held-out sets: the same test",
        "images, prompted and captioned with synonyms and sentence frames that no training",
        'caption contains (project/world/heldout.py). "weights chosen on val": for each metric,',
        "the convex combination of the main pair and the frozen towers' pairs that scores best",
        "on the validation splits, reported on test.",
        "",
        header,
        "|" + "---|" * (len(METRICS) + 1),
    ]
    for label, row in table.items():
        cells = " | ".join(f"{row[k][0]:.1f} ± {row[k][1]:.1f}" for k in METRICS)
        lines.append(f"| {label} | {cells} |")
    lines.append("| chance | " + " | ".join(f"{chance[k]:.1f}" for k in METRICS) + " |")
    lines += ["", "## Questions", "", "| question | metric | result | numbers |"]
    lines.append("|---|---|---|---|")
    for c in checks:
        lines.append(f"| {c['question']} | {c['metric']} | {c['status']} | {c['detail']} |")
    lines += ["", "A tie: the gap is no larger than the two seed spreads added together."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """Two panels, held-out and ordinary sets: bars per metric, one per line of the table."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2))
    FigureCanvasAgg(fig)
    width = 0.8 / len(table)
    for panel, (title, metrics) in enumerate((("held-out words", HELDOUT), ("ordinary", ORDINARY))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for offset, (label, row) in enumerate(table.items()):
            xs = [i - 0.4 + (offset + 0.5) * width for i in range(len(metrics))]
            means = [row[k][0] for k in metrics]
            stds = [row[k][1] for k in metrics]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=label)
        ax.set_xticks(range(len(metrics)), [LABELS[k] for k in metrics], fontsize="small")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)


def write_report(out: Path, cfg: Config, records: list[dict], chance: dict) -> dict:
    table = summary(records)
    checks = findings(table)
    results = {
        "experiment": "open-vocab",
        "runs": records,
        "summary": {label: {k: list(v) for k, v in row.items()} for label, row in table.items()},
        "findings": checks,
        "chance": {k: chance[k] for k in METRICS},
        "config": cfg.model_dump(mode="json"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(table, checks, chance))
    plot(table, out / "open_vocab.png")
    return results


def open_vocab(cfg: Config, out: str | Path, progress: bool = True) -> dict:
    """Train, test and validate every run of the experiment; write the report to ``out``."""
    specs = {spec.name: spec for spec in plan(cfg.reproduce.seeds)}
    records = {}

    def describe(job: Job, result) -> str:
        if job.name not in specs:
            return f"{job.name} ready"
        records[job.name] = run_record(specs[job.name], Path(job.args[0].train.run_dir))
        scores = "  ".join(f"{k} {records[job.name][k]:5.1f}" for k in HELDOUT)
        return f"{job.name:<24} {scores}"

    out = Path(out)
    todo = run_experiment(cfg, out, jobs, describe, "open-vocab", progress)
    first = Path(todo[-1].args[0].train.run_dir)
    chance = read_json(first / "chance.json")
    return write_report(out, cfg, [records[name] for name in specs], chance)
