"""The report of ``threetowers reproduce``: results.json, results.md and the figures.

Means and sample standard deviations over seeds; a difference no larger than the two seed
spreads added together counts as a tie, so that noise is never reported as a finding.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from threetowers.config import Config
from threetowers.errors import UserError
from threetowers.evaluation.sweep_plots import plot_alpha_sweep
from threetowers.files.readback import read_json

METRICS = ("zeroshot_top1", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "fewshot_top1")
HEADLINE = ("zeroshot_top1", "i2t_R@1", "t2i_R@1")
SWEEP_METRICS = HEADLINE
LABELS = {
    "zeroshot_top1": "zero-shot top-1",
    "i2t_R@1": "image→text R@1",
    "t2i_R@1": "text→image R@1",
    "i2t_R@5": "image→text R@5",
    "t2i_R@5": "text→image R@5",
    "fewshot_top1": "few-shot top-1",
}
METHOD_NAMES = {"clip": "CLIP", "lit": "LiT", "3t": "3T"}


def run_record(setting: str, method: str, seed: int, run_dir: Path) -> dict:
    """One run's entry of results.json, read from its eval.json."""
    scores = read_json(run_dir / "eval.json")
    missing = [k for k in METRICS if k not in scores]
    if missing:
        raise UserError(
            f"{run_dir}/eval.json lacks {missing}; reproduce needs the world's retrieval, "
            "zero-shot and few-shot benchmarks (leave eval.retrieval and eval.zeroshot unset)"
        )
    record = {"setting": setting, "method": method, "seed": seed, "run_dir": str(run_dir)}
    record |= {k: scores[k] for k in METRICS}
    if method == "3t":
        record["alpha_sweep"] = [
            {"alpha": row["alpha"]} | {k: row[k] for k in SWEEP_METRICS}
            for row in scores["alpha_sweep"]
        ]
    return record


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) over seeds; one seed: a spread of 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict]) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """(setting, method) -> metric -> (mean, std over seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["setting"], record["method"]), []).append(record)
    return {
        key: {k: spread([r[k] for r in rows]) for k in METRICS} | {"seeds": len(rows)}
        for key, rows in groups.items()
    }


def mean_sweeps(records: list[dict]) -> dict[str, list[dict]]:
    """setting -> the 3T α-sweep averaged over seeds."""
    by_setting: dict[str, list[list[dict]]] = {}
    for record in records:
        if record["method"] == "3t":
            by_setting.setdefault(record["setting"], []).append(record["alpha_sweep"])
    out = {}
    for setting, sweeps in by_setting.items():
        out[setting] = [
            {"alpha": rows[0]["alpha"]}
            | {k: statistics.fmean(row[k] for row in rows) for k in SWEEP_METRICS}
            for rows in zip(*sweeps, strict=True)
        ]
    return out


def compare(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'>' , '<' or 'tie' for two (mean, std): a tie when the gap is within both spreads."""
    gap = a[0] - b[0]
    if abs(gap) <= a[1] + b[1] or gap == 0:
        return "tie"
    return ">" if gap > 0 else "<"


def findings(summary: dict, sweeps: dict[str, list[dict]], settings: list[str]) -> list[dict]:
    """The paper's four claims, each checked per setting: holds, tie or fails."""
    out = []
    clip = summary.get(("none", "clip"))

    def check(claim: str, setting: str, metric: str, a: str, b: str, wanted: str) -> None:
        left = clip if a == "clip" else summary.get((setting, a))
        right = clip if b == "clip" else summary.get((setting, b))
        if left is None or right is None:
            return
        result = compare(left[metric], right[metric])
        status = "holds" if result == wanted else "tie" if result == "tie" else "fails"
        out.append(
            {
                "claim": claim,
                "setting": setting,
                "status": status,
                "detail": f"{METHOD_NAMES[a]} {left[metric][0]:.1f} ± {left[metric][1]:.1f} vs "
                f"{METHOD_NAMES[b]} {right[metric][0]:.1f} ± {right[metric][1]:.1f}",
            }
        )

    for setting in settings:
        for metric in ("i2t_R@1", "t2i_R@1"):
            check(f"retrieval {metric}: 3T > LiT", setting, metric, "3t", "lit", ">")
            check(f"retrieval {metric}: 3T > CLIP", setting, metric, "3t", "clip", ">")
        check("zero-shot: 3T > CLIP", setting, "zeroshot_top1", "3t", "clip", ">")
    if "mismatched" in settings:
        check("mismatched zero-shot: 3T > LiT", "mismatched", "zeroshot_top1", "3t", "lit", ">")
        check("mismatched zero-shot: LiT < CLIP", "mismatched", "zeroshot_top1", "lit", "clip", "<")
    for setting, rows in sweeps.items():
        ends = {rows[0]["alpha"]: rows[0], rows[-1]["alpha"]: rows[-1]}
        best = []
        for metric in SWEEP_METRICS:
            inner = max(rows[1:-1], key=lambda r: r[metric], default=None)
            if inner is not None and all(inner[metric] >= end[metric] for end in ends.values()):
                best.append(f"{metric} at α={inner['alpha']:g}: {inner[metric]:.1f}")
        out.append(
            {
                "claim": "some α in (0, 1) ≥ both ends",
                "setting": setting,
                "status": "holds" if best else "fails",
                "detail": "; ".join(best) or "no interior α reaches both ends on any metric",
            }
        )
    return out


def markdown(
    summary: dict, checks: list[dict], classifiers: dict, settings: list[str], splits: str
) -> str:
    header = "| setting | method | " + " | ".join(LABELS[k] for k in METRICS) + " |"
    lines = [
        "# CLIP vs LiT vs 3T on the embedded world",
        "",
        f"Mean ± standard deviation over seeds (%; {splits}).",
        "",
        header,
        "|" + "---|" * (len(METRICS) + 2),
    ]
    rows = [("none", "clip")] + [(s, m) for s in settings for m in ("lit", "3t")]
    for key in rows:
        if key in summary:
            row = summary[key]
            cells = " | ".join(
                f"{row[k][0]:.1f}" + (f" ± {row[k][1]:.1f}" if row["seeds"] > 1 else "")
                for k in METRICS
            )
            setting = "—" if key[0] == "none" else key[0]
            lines.append(f"| {setting} | {METHOD_NAMES[key[1]]} | {cells} |")
    seeds = {value["seeds"] for value in summary.values()}
    lines += ["", f"Seeds per row: {', '.join(map(str, sorted(seeds)))}."]
    if classifiers:
        lines += ["", "Third-tower classifiers pretrained here (validation top-1):", ""]
        lines += [
            f"- {setting}: {report['classes']} classes, {report['val_top1']:.1f}%"
            for setting, report in classifiers.items()
        ]
    lines += ["", "## The paper's claims", "", "| claim | setting | result | numbers |"]
    lines.append("|---|---|---|---|")
    lines += [f"| {c['claim']} | {c['setting']} | {c['status']} | {c['detail']} |" for c in checks]
    lines += ["", "A tie: the gap is no larger than the two seed spreads added together."]
    if seeds == {1}:
        lines.append("With one seed there is no spread: every gap counts, noise included.")
    return "\n".join(lines) + "\n"


def plot_bars(summary: dict, settings: list[str], path: Path) -> None:
    """One panel per metric: bars per method, grouped by setting (CLIP repeated as reference)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * 3, 3.4 * 2))
    FigureCanvasAgg(fig)
    width = 0.26
    for panel, metric in enumerate(METRICS):
        ax = fig.add_subplot(2, 3, panel + 1)
        for offset, method in enumerate(("clip", "lit", "3t")):
            keys = [("none" if method == "clip" else s, method) for s in settings]
            means = [summary[k][metric][0] if k in summary else 0.0 for k in keys]
            stds = [summary[k][metric][1] if k in summary else 0.0 for k in keys]
            xs = [i + (offset - 1) * width for i in range(len(settings))]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=METHOD_NAMES[method])
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(LABELS[metric], fontsize="medium")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        if panel == 0:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)


def write_report(out: Path, cfg: Config, records: list[dict], classifiers: dict) -> dict:
    """Write results.json, results.md, bars.png and alpha.png to ``out``; return the results."""
    settings = cfg.reproduce.settings
    summary = summarise(records)
    sweeps = mean_sweeps(records)
    checks = findings(summary, sweeps, settings)
    results = {
        "runs": records,
        "findings": checks,
        "classifiers": classifiers,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    splits = (
        f"retrieval on the {cfg.eval.retrieval_split} split, "
        f"classification on the {cfg.eval.zeroshot_split} split"
    )
    (out / "results.md").write_text(markdown(summary, checks, classifiers, settings, splits))
    plot_bars(summary, settings, out / "bars.png")
    if sweeps:
        plot_alpha_sweep(sweeps, SWEEP_METRICS, out / "alpha.png")
    return results


def weight_rows(scores: dict, parts: tuple[str, ...]) -> list[dict]:
    """eval.json's mixture as ``{"weights": {part: w}, metric: value}`` rows; ``parts``: the
    run's parts besides f (the one tower's name for an ``alpha_sweep``)."""
    if "alpha_sweep" in scores:
        (part,) = parts
        return [
            {"weights": {"f": row["alpha"], part: round(1 - row["alpha"], 10)}} | row
            for row in scores["alpha_sweep"]
        ]
    return scores["alpha_grid"]


def chosen_on_val(
    test: dict, val: dict, parts: tuple[str, ...], metrics: tuple[str, ...]
) -> dict[str, dict]:
    """metric -> the mixture weights that score best on val, with their val and test values
    (ties on val go to the first such weights in the sweep's order); ``test`` and ``val``:
    a run's eval.json on each split."""
    val_rows, test_rows = weight_rows(val, parts), weight_rows(test, parts)
    if [r["weights"] for r in val_rows] != [r["weights"] for r in test_rows]:
        raise ValueError("eval.json and eval_val.json sweep different weights")
    chosen = {}
    for metric in metrics:
        best = max(range(len(val_rows)), key=lambda i: (val_rows[i][metric], -i))
        chosen[metric] = {
            "weights": val_rows[best]["weights"],
            "val": val_rows[best][metric],
            "test": test_rows[best][metric],
        }
    return chosen
