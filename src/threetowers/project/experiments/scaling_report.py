"""The scaling experiment's report from its records: curves per axis and method, the slopes
of 3T - LiT (and - CLIP) over log size, the claim's verdicts, results.md and one figure per
metric. Pure functions of the records (and the step check's rows), so a report can also be
made from the records of more than one run of the experiment."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from threetowers.config import Config
from threetowers.project.experiments.report import HEADLINE, LABELS, METHOD_NAMES, compare, spread

AXES = ("pairs", "towers", "third")
AXIS_LABELS = {
    "pairs": "training pairs",
    "towers": "parameters of f and g",
    "third": "parameters of the frozen tower h",
}


def curves(records: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """axis -> method -> points (size order): size, label, and per metric (mean, std)."""
    out: dict[str, dict[str, list[dict]]] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["size_axis"], r["method"], r["size"], r["size_label"]), []).append(r)
    for (axis, method, size, label), runs in sorted(groups.items(), key=lambda kv: kv[0][2]):
        point = {"size": size, "size_label": label, "seeds": len(runs)}
        point |= {k: spread([r[k] for r in runs]) for k in HEADLINE}
        out.setdefault(axis, {}).setdefault(method, []).append(point)
    order = ("clip", "lit", "3t")
    return {
        axis: {m: out[axis][m] for m in order if m in out[axis]} for axis in AXES if axis in out
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ``ys`` over ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def gain_slopes(records: list[dict], method: str, baseline: str) -> dict[str, dict]:
    """axis -> metric -> the slope of (method - baseline) over log2(size): per seed (each
    seed's own difference at every size), and their mean and std."""
    out: dict[str, dict] = {}
    axes = sorted({r["size_axis"] for r in records if r["method"] == baseline}, key=AXES.index)
    for axis in axes:
        by = {
            (r["method"], r["seed"], r["size"]): r
            for r in records
            if r["size_axis"] == axis and r["method"] in (method, baseline)
        }
        seeds = sorted({seed for (_, seed, _) in by})
        sizes_ = sorted({size for (_, _, size) in by})
        out[axis] = {}
        for metric in HEADLINE:
            per_seed = []
            for seed in seeds:
                keys = [(method, seed, s) in by and (baseline, seed, s) in by for s in sizes_]
                if not all(keys) or len(sizes_) < 2:
                    continue
                gaps = [
                    by[(method, seed, s)][metric] - by[(baseline, seed, s)][metric] for s in sizes_
                ]
                per_seed.append(slope([math.log2(s) for s in sizes_], gaps))
            if per_seed:
                mean, std = spread(per_seed)
                out[axis][metric] = {"per_seed": per_seed, "mean": mean, "std": std}
    return out


def verdicts(slopes: dict[str, dict]) -> list[dict]:
    """ "3T's gain over LiT grows with size" per axis and metric: holds, tie or fails."""
    out = []
    for axis, metrics in slopes.items():
        for metric, s in metrics.items():
            result = compare((s["mean"], s["std"]), (0.0, 0.0))
            out.append(
                {
                    "claim": "3T's gain over LiT grows with size",
                    "axis": axis,
                    "metric": metric,
                    "status": {">": "holds", "<": "fails"}.get(result, "tie"),
                    "slope_per_doubling": s["mean"],
                    "slope_std": s["std"],
                }
            )
    return out


def markdown(
    curve: dict, checks: list[dict], gains_clip: dict, step_rows: list[dict], steps: int, cfg
) -> str:
    lines = [
        "# Scaling: does 3T gain more than LiT from scale?",
        "",
        f"CLIP, LiT and 3T (third tower EfficientNet-Lite0 unless the axis varies it), "
        f"{steps} steps of batch {cfg.data.batch_size} every run; mean ± standard deviation "
        f"over seeds (%, retrieval on the {cfg.eval.retrieval_split} split, zero-shot on the "
        f"{cfg.eval.zeroshot_split} split).",
        "",
    ]
    for axis, methods in curve.items():
        lines += [f"## {AXIS_LABELS[axis]}", ""]
        header = "| method | size | " + " | ".join(LABELS[k] for k in HEADLINE) + " |"
        lines += [header, "|" + "---|" * (len(HEADLINE) + 2)]
        for method, points in methods.items():
            for p in points:
                cells = " | ".join(f"{p[k][0]:.1f} ± {p[k][1]:.1f}" for k in HEADLINE)
                size = f"{p['size_label']} ({p['size']:,})" if axis != "pairs" else f"{p['size']:,}"
                lines.append(f"| {METHOD_NAMES[method]} | {size} | {cells} |")
        lines.append("")
    lines += [
        "## The claim: 3T's gain over LiT grows with size",
        "",
        "Slope of 3T − LiT (points of the metric per doubling of the size), from each seed's",
        "own differences; holds when the mean slope is above zero by more than its std.",
        "",
        "| axis | metric | slope of 3T − LiT | result | slope of 3T − CLIP |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        vs_clip = gains_clip.get(c["axis"], {}).get(c["metric"])
        clip_cell = f"{vs_clip['mean']:+.2f} ± {vs_clip['std']:.2f}" if vs_clip else "—"
        lines.append(
            f"| {c['axis']} | {LABELS[c['metric']]} | {c['slope_per_doubling']:+.2f} ± "
            f"{c['slope_std']:.2f} | {c['status']} | {clip_cell} |"
        )
    if step_rows:
        first = step_rows[0]
        lines += [
            "",
            "## Are the largest runs step-limited?",
            "",
            f"The largest run of each axis, seed 0, trained again for {first['longer_steps']} "
            f"steps instead of {first['steps']}.",
            "",
            f"| axis | run | method | metric | at {first['steps']} steps | at "
            f"{first['longer_steps']} | gain | seed std | result |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in step_rows:
            lines.append(
                f"| {s['axis']} | {s['size_label']} | {METHOD_NAMES[s['method']]} | "
                f"{LABELS[s['metric']]} | {s['seed0']:.1f} | {s['longer']:.1f} | "
                f"{s['gain']:+.1f} | {s['seed_std']:.1f} | {s['status']} |"
            )
    return "\n".join(lines) + "\n"


def plot(curve: dict, metric: str, steps: int, path: Path) -> None:
    """One panel per axis: ``metric`` against size (log scale), a line per method, the seed
    spread shaded; CLIP, which has no third tower, is a dashed level on that axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * len(curve), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(curve), squeeze=False)[0]
    colours = {"clip": "tab:blue", "lit": "tab:orange", "3t": "tab:green"}
    for ax, (axis, methods) in zip(axes, curve.items(), strict=True):
        for method, points in methods.items():
            xs = [p["size"] for p in points]
            means = [p[metric][0] for p in points]
            stds = [p[metric][1] for p in points]
            ax.plot(xs, means, marker="o", color=colours[method], label=METHOD_NAMES[method])
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, low, high, color=colours[method], alpha=0.2)
        if "clip" not in methods and "clip" in curve.get("pairs", {}):
            base = curve["pairs"]["clip"][-1]  # every pair: the base point, as on this axis
            ax.axhline(base[metric][0], color=colours["clip"], ls="--", label="CLIP (no h)")
        ax.set_xscale("log", base=2)
        # ticks at the sizes trained, named as the runs are (Lite1 and Lite2 are only 1.2x
        # and 1.3x Lite0: powers of two would leave that axis bare)
        points = next(iter(methods.values()))
        names = [p["size_label"].replace("efficientnet_lite", "Lite") for p in points]
        ax.set_xticks([p["size"] for p in points], names)
        ax.minorticks_off()
        ax.set_xlabel(f"{AXIS_LABELS[axis]} ({steps} steps)")
        ax.set_ylabel(f"{LABELS[metric]} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)


def write_report(
    out: Path, cfg: Config, records: list[dict], step_rows: list[dict], steps: int
) -> dict:
    """results.json, results.md and the figures in ``out``; ``step_rows`` are the step
    check's rows, ``steps`` every run's training steps."""
    curve = curves(records)
    slopes = gain_slopes(records, "3t", "lit")
    vs_clip = gain_slopes(records, "3t", "clip")
    checks = verdicts(slopes)
    results = {
        "experiment": "scaling",
        "runs": records,
        "claim": checks,
        "slopes_3t_minus_lit": slopes,
        "slopes_3t_minus_clip": vs_clip,
        "step_check": step_rows,
        "steps": steps,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(curve, checks, vs_clip, step_rows, steps, cfg))
    for metric in HEADLINE:
        plot(curve, metric, steps, out / f"scaling_{metric.replace('@', '')}.png")
    return results
