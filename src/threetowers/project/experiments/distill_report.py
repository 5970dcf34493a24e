"""The distill experiment's report from its records: the teacher and each student (mean ± std
over seeds), the share of the teacher - CLIP gap each student closes, the mixture weights
chosen on val, the experiment's questions, results.json, results.md and one figure. Pure
functions of the records, apart from reading each run's eval files into its record."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from threetowers.config import Config, load_config
from threetowers.files.readback import read_json
from threetowers.project.experiments.report import HEADLINE, LABELS, chosen_on_val, compare, spread
from threetowers.project.experiments.reproduce import RunSpec

METRICS = ("zeroshot_top1", "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")
NAMES = {
    "teacher": "teacher (3T, L towers)",
    "none": "CLIP",
    "imagenet": "3T + Lite0",
    "pair": "3T + teacher",
    "both": "3T + Lite0 + teacher",
    "distill": "distillation alone",
}
STUDENTS = ("none", "imagenet", "pair", "both", "distill")
# the students whose mixture weights chosen on val get a line of their own: those with the
# teacher pair, whose mixture can include the teacher's own score (part t)
MIXED = ("pair", "both", "distill")
CHOSEN = ", weights chosen on val"
MIXTURES = {"alpha_sweep", "alpha_grid"}  # eval.json's mixture sweep, one tower or more


# ------------------------------------------------------------------------ records
def run_record(spec: RunSpec, run_dir: Path) -> dict:
    """One run's entry of results.json in the grid's schema (setting, method, seed, run_dir,
    metrics: the deployed (z_f, z_g) on test), with its towers and steps, and for a 3T student
    evaluated with the mixture sweep the weights chosen on val (``best_alpha``, as
    open-vocab's records)."""
    test = read_json(run_dir / "eval.json")
    cfg = load_config(run_dir / "config.yaml")
    record = {"setting": spec.setting, "method": spec.method, "seed": spec.seed}
    record |= {"run_dir": str(run_dir), "image_width": cfg.model.image.width, "step": test["step"]}
    record |= {k: test[k] for k in METRICS}
    if spec.method == "3t" and spec.setting != "teacher" and MIXTURES & test.keys():
        val = read_json(run_dir / "eval_val.json")
        record["best_alpha"] = chosen_on_val(test, val, cfg.model.structure().parts, METRICS)
    return record


# ------------------------------------------------------------------------ statistics
def table(records: list[dict]) -> dict[str, dict]:
    """line -> metric -> (mean, std over seeds), and its seeds: the teacher, each student as
    deployed, then the students with the teacher pair at the weights chosen on val."""
    out = {}
    for setting in ("teacher", *STUDENTS):
        runs = [r for r in records if r["setting"] == setting]
        if runs:
            out[NAMES[setting]] = {k: spread([r[k] for r in runs]) for k in METRICS}
            out[NAMES[setting]]["seeds"] = len(runs)
    for setting in MIXED:
        runs = [r for r in records if r["setting"] == setting and "best_alpha" in r]
        if runs:
            line = {k: spread([r["best_alpha"][k]["test"] for r in runs]) for k in METRICS}
            out[NAMES[setting] + CHOSEN] = line | {"seeds": len(runs)}
    return out


def gap_closed(records: list[dict]) -> dict[str, dict[str, dict]]:
    """student -> metric -> the share of the teacher - CLIP gap it closes, from the means:
    (student - CLIP) / (teacher - CLIP); ``std``: the spread of the same share seed by seed
    (each seed's student against that seed's CLIP). None where the teacher is not above CLIP
    (no gap to close)."""
    by = {(r["setting"], r["seed"]): r for r in records}
    teacher = next(r for r in records if r["setting"] == "teacher")
    clip = [r for r in records if r["setting"] == "none"]
    out: dict[str, dict[str, dict]] = {}
    for setting in STUDENTS[1:]:
        runs = [r for r in records if r["setting"] == setting]
        if not runs or not clip:
            continue
        out[NAMES[setting]] = {}
        for metric in METRICS:
            gap = teacher[metric] - statistics.fmean(r[metric] for r in clip)
            if gap <= 0:
                out[NAMES[setting]][metric] = {"fraction": None, "std": None, "gap": gap}
                continue
            mean = statistics.fmean(r[metric] for r in runs)
            clip_mean = statistics.fmean(r[metric] for r in clip)
            per_seed = [
                (r[metric] - by["none", r["seed"]][metric])
                / (teacher[metric] - by["none", r["seed"]][metric])
                for r in runs
                if ("none", r["seed"]) in by and teacher[metric] > by["none", r["seed"]][metric]
            ]
            out[NAMES[setting]][metric] = {
                "fraction": (mean - clip_mean) / gap,
                "std": spread(per_seed)[1] if per_seed else None,
                "gap": gap,
            }
    return out


QUESTIONS = (
    # (question, a, b): does line a come out above line b
    ("the teacher pair teaches a 3T student more than Lite0", "pair", "imagenet"),
    ("Lite0 adds to the teacher pair", "both", "pair"),
    ("distillation alone beats CLIP", "distill", "none"),
    ("the pair's alignment terms add to distillation", "pair", "distill"),
    ("the teacher pair beats CLIP", "pair", "none"),
)


def findings(summary: dict) -> list[dict]:
    """Each question per headline metric: holds (a above b beyond the seeds' spreads), tie
    (within them) or fails."""
    out = []
    for question, a, b in QUESTIONS:
        if NAMES[a] not in summary or NAMES[b] not in summary:
            continue
        for metric in HEADLINE:
            left, right = summary[NAMES[a]][metric], summary[NAMES[b]][metric]
            result = compare(left, right)
            out.append(
                {
                    "question": question,
                    "metric": metric,
                    "status": {">": "holds", "<": "fails"}.get(result, result),
                    "detail": f"{NAMES[a]} {left[0]:.1f} ± {left[1]:.1f} vs {NAMES[b]} "
                    f"{right[0]:.1f} ± {right[1]:.1f}",
                }
            )
    return out


# ------------------------------------------------------------------------ files
def _cell(value: tuple[float, float], seeds: int) -> str:
    return f"{value[0]:.1f}" + (f" ± {value[1]:.1f}" if seeds > 1 else "")


def _share(entry: dict) -> str:
    if entry["fraction"] is None:
        return f"— (no gap: {entry['gap']:+.1f})"
    spread_ = f" ± {entry['std']:.2f}" if entry["std"] else ""
    return f"{entry['fraction']:.2f}{spread_}"


def markdown(summary: dict, shares: dict, checks: list[dict], chance: dict, steps: dict) -> str:
    header = " | ".join(LABELS[k] for k in METRICS)
    lines = [
        "# Distillation: a large 3T teacher taught into small students",
        "",
        f"Test splits, %: the teacher (one seed, {steps['teacher']} steps) and the students "
        f"(mean ± std over seeds, {steps['student']} steps) as deployed, (z_f, z_g). "
        f'"{CHOSEN[2:]}": the mixture of the main pair and the frozen towers\' pairs (the teacher '
        "pair's own score among them) that scores best on the validation splits, on test.",
        "",
        f"| run | seeds | {header} |",
        "|" + "---|" * (len(METRICS) + 2),
    ]
    for label, row in summary.items():
        cells = " | ".join(_cell(row[k], row["seeds"]) for k in METRICS)
        lines.append(f"| {label} | {row['seeds']} | {cells} |")
    lines.append("| chance | — | " + " | ".join(f"{chance[k]:.1f}" for k in METRICS) + " |")
    lines += [
        "",
        "## Share of the teacher − CLIP gap closed",
        "",
        "(student − CLIP) / (teacher − CLIP) from the means; ± the spread of the same share "
        "seed by seed (each student against the CLIP run of its seed).",
        "",
        f"| student | {header} |",
        "|" + "---|" * (len(METRICS) + 1),
    ]
    for label, row in shares.items():
        lines.append(f"| {label} | " + " | ".join(_share(row[k]) for k in METRICS) + " |")
    lines += ["", "## Questions", "", "| question | metric | result | numbers |"]
    lines.append("|---|---|---|---|")
    for c in checks:
        lines.append(f"| {c['question']} | {c['metric']} | {c['status']} | {c['detail']} |")
    lines += ["", "A tie: the gap is no larger than the two seed spreads added together."]
    if all(row["seeds"] == 1 for row in summary.values()):
        lines.append("With one seed there is no spread: every gap counts, noise included.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """One panel per metric: a bar per line of the table as deployed (mean, std over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    deployed = {label: row for label, row in summary.items() if not label.endswith(CHOSEN)}
    fig = Figure(figsize=(3.2 * len(METRICS), 3.8))
    FigureCanvasAgg(fig)
    colours = [f"C{i}" for i in range(len(deployed))]
    for panel, metric in enumerate(METRICS):
        ax = fig.add_subplot(1, len(METRICS), panel + 1)
        means = [row[metric][0] for row in deployed.values()]
        stds = [row[metric][1] for row in deployed.values()]
        ax.bar(range(len(deployed)), means, yerr=stds, capsize=2, color=colours)
        ax.set_xticks(range(len(deployed)), list(deployed), rotation=60, ha="right")
        ax.set_title(LABELS[metric], fontsize="medium")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)


def write_report(out: Path, cfg: Config, records: list[dict]) -> dict:
    """results.json, results.md and distill.png in ``out``; returns the results."""
    summary = table(records)
    shares = gap_closed(records)
    checks = findings(summary)
    chance = read_json(Path(records[-1]["run_dir"]) / "chance.json")
    steps = {
        "teacher": next(r["step"] for r in records if r["setting"] == "teacher"),
        "student": next(r["step"] for r in records if r["setting"] != "teacher"),
    }
    results = {
        "experiment": "distill",
        "runs": records,
        "summary": {
            label: {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
            for label, row in summary.items()
        },
        "gap_closed": shares,
        "findings": checks,
        "chance": {k: chance[k] for k in METRICS},
        "steps": steps,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(summary, shares, checks, results["chance"], steps))
    plot(summary, out / "distill.png")
    return results
