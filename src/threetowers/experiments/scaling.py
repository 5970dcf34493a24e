"""``threetowers reproduce --experiment scaling``: does 3T gain more than LiT from scale?

The paper finds that 3T's advantage over LiT grows with the model and with the data. This
experiment trains CLIP, LiT and 3T (the ImageNet tower, EfficientNet-Lite0) along three
axes through one base point (the whole training set, the config's towers, Lite0):

- ``pairs``: the training set cut to 1/8, 1/4, 1/2 and all of the world's pairs. A smaller
  set is the world regenerated with fewer training pairs (``OUT/worlds/``): samples are
  drawn per index, so it is a prefix of the full set, and its validation and test sets are
  the same images and captions. Every run takes the same steps, so smaller sets are seen for
  more epochs, and all share one tokenizer (trained on the full set).
- ``towers``: f and g together, narrower and shallower (S) or wider and deeper (L) than the
  config's towers (M), the embedding dimension and everything else unchanged.
- ``third``: the frozen tower itself, EfficientNet-Lite0, -Lite1 and -Lite2 (LiT and 3T).

The claim is checked per metric and axis as the slope of 3T minus LiT (each seed's own
difference) over log2 of the size, mean ± std over seeds: "holds" when the mean is above
zero by more than its spread. The largest runs (L towers on every pair) are trained once
more with 1.5x the steps (seed 0): the report says whether that moves them beyond the seed
spread, i.e. whether the step count limits them.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from threetowers.config import Config, ImageTowerConfig, TextTowerConfig
from threetowers.data.pipeline import ensure_world
from threetowers.experiments.driver import run_experiment
from threetowers.experiments.jobs import Job
from threetowers.experiments.report import HEADLINE, LABELS, METHOD_NAMES, compare, run_record
from threetowers.experiments.reproduce import (
    prepare_data,
    shared_tokenizer,
    train_run,
    with_run,
)
from threetowers.model.build import build_model

PAIR_FRACTIONS = (8, 4, 2, 1)  # the training set cut to 1/8 ... all of it
# f and g together, relative to the config's towers (M): width x factor (whole heads of the
# same head width), image and text depth + step (at least 1). The reproduce preset's
# 96-wide, 2 + 1 layer towers become S = 64 wide, 1 + 1 layers and L = 128 wide, 3 + 2.
TOWERS = {"S": (2 / 3, -1), "M": (1.0, 0), "L": (4 / 3, 1)}
THIRD = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
AXES = ("pairs", "towers", "third")
AXIS_LABELS = {
    "pairs": "training pairs",
    "towers": "parameters of f and g",
    "third": "parameters of the frozen tower h",
}
STEP_CHECK_FACTOR = 1.5
TowerConfig = ImageTowerConfig | TextTowerConfig
SETTING = "imagenet"  # the records' setting in the grid's schema: the third tower is ImageNet's


@dataclass(frozen=True)
class Point:
    """One run's place on the axes: its training pairs, its towers, its third tower."""

    pairs: int
    towers: str = "M"
    third: str = THIRD[0]
    method: str = "3t"
    seed: int = 0
    longer: bool = False  # the step check's run, STEP_CHECK_FACTOR x the steps

    @property
    def name(self) -> str:
        third = "" if self.method == "clip" else f"-{self.third.removeprefix('efficientnet_')}"
        steps = "-longer" if self.longer else ""
        return f"pairs{self.pairs}-towers{self.towers}{third}-{self.method}-seed{self.seed}{steps}"

    def data_job(self) -> str:
        """The job that caches what this run reads (CLIP reads 3T's preloaded pixels)."""
        return f"data:pairs{self.pairs}-{self.third}"


def pair_counts(full: int) -> list[int]:
    return [full // fraction for fraction in PAIR_FRACTIONS]


def axis_points(full: int, method: str, seed: int) -> dict[str, list[Point]]:
    """axis -> its points for one method and seed, smallest first (the base point is on
    each axis). CLIP has no third tower, so no third axis."""
    axes = {
        "pairs": [Point(n, method=method, seed=seed) for n in pair_counts(full)],
        "towers": [Point(full, towers, method=method, seed=seed) for towers in TOWERS],
    }
    if method != "clip":
        axes["third"] = [Point(full, "M", third, method, seed) for third in THIRD]
    return axes


def plan(full: int, seeds: int) -> list[Point]:
    """Every run once, seed by seed (a stopped command has whole seeds to report); the
    step check after the first seed."""
    runs: list[Point] = []
    for seed in range(seeds):
        for method in ("clip", "lit", "3t"):
            for points in axis_points(full, method, seed).values():
                runs += [p for p in points if p not in runs]
        if seed == 0:
            runs += [Point(full, "L", method=m, longer=True) for m in ("clip", "lit", "3t")]
    return runs


def world_dir(cfg: Config, out: Path, pairs: int) -> str:
    if pairs == cfg.data.world.train_pairs:
        return cfg.data.world.dir
    return str(out / "worlds" / f"pairs{pairs}")


def resized(tower: TowerConfig, factor: float, depth_step: int) -> TowerConfig:
    """``tower`` with ``factor`` x its width in whole heads of its head width, and its depth
    moved by ``depth_step`` (at least 1)."""
    head_width = tower.width // tower.heads
    heads = max(1, round(tower.width * factor / head_width))
    return tower.model_copy(
        update={
            "width": heads * head_width,
            "heads": heads,
            "depth": max(1, tower.depth + depth_step),
        }
    )


def run_config(cfg: Config, point: Point, out: Path) -> Config:
    """``cfg`` for one run: its world, towers, third tower, mode, seed, steps and directory."""
    world = cfg.data.world.model_copy(update={"dir": world_dir(cfg, out, point.pairs)})
    if point.pairs != cfg.data.world.train_pairs:
        # The classifier sets are never read here: a token size keeps generation short.
        small = {"pretrain_objects_per_class": 10, "pretrain_scenes_per_class": 10}
        world = world.model_copy(update={"train_pairs": point.pairs} | small)
    model = cfg.model.model_copy(update={"mode": point.method})
    image, text = (resized(tower, *TOWERS[point.towers]) for tower in (model.image, model.text))
    model = model.model_copy(update={"image": image, "text": text})
    third = model.third.model_copy(update={"backbone": point.third, "path": None})
    model = model.model_copy(update={"third": third})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"world": world})})
    if point.longer:
        steps = round(cfg.train.steps * STEP_CHECK_FACTOR)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
    return with_run(cfg, model, point, out)


def check_sizes(cfg: Config) -> None:
    smallest = min(pair_counts(cfg.data.world.train_pairs))
    if smallest < cfg.data.batch_size:
        raise ValueError(
            f"the scaling experiment's smallest training set, 1/{max(PAIR_FRACTIONS)} of "
            f"data.world.train_pairs={cfg.data.world.train_pairs}, is {smallest} pairs, fewer "
            f"than one batch (data.batch_size={cfg.data.batch_size}); raise "
            "data.world.train_pairs or lower data.batch_size"
        )


def jobs(cfg: Config, out: Path) -> list[Job]:
    """The smaller worlds (made here, before any worker reads them), the shared tokenizer,
    each (world, third tower)'s caches, then the runs in the plan's order."""
    check_sizes(cfg)
    full = cfg.data.world.train_pairs
    base = run_config(cfg, Point(full, method="clip"), out)  # trains the shared tokenizer
    cfg, tokenizer = shared_tokenizer(cfg, out)
    out_jobs = [Job("data:tokenizer", prepare_data, ([base], tokenizer))]
    runs = plan(full, cfg.reproduce.seeds)
    for point in {p.data_job(): p for p in runs if p.method != "clip"}.values():
        configs = [
            run_config(cfg, Point(point.pairs, "M", point.third, method), out)
            for method in ("lit", "3t")
        ]
        ensure_world(configs[0].data.world)
        out_jobs.append(Job(point.data_job(), prepare_data, (configs,), ("data:tokenizer",)))
    for point in runs:
        job = Job(point.name, train_run, (run_config(cfg, point, out),), (point.data_job(),))
        out_jobs.append(job)
    return out_jobs


# ------------------------------------------------------------------------ sizes
def tower_parameters(cfg: Config, towers: str) -> int:
    """Parameters of CLIP's f and g at ``towers`` (LiT's g and 3T's f, g are the same)."""
    run = run_config(cfg, Point(cfg.data.world.train_pairs, towers, method="clip"), Path("."))
    model = build_model(run, device="meta")
    return sum(
        p.numel() for tower in (model.image_tower, model.text_tower) for p in tower.parameters()
    )


def third_parameters(cfg: Config, third: str) -> int:
    """Parameters of the frozen tower ``third``, as it runs here (no classifier layer)."""
    run = run_config(cfg, Point(cfg.data.world.train_pairs, "M", third, "lit"), Path("."))
    model = build_model(run.model.model_copy(update={"mode": "lit"}))
    return sum(p.numel() for p in model.frozen["h"].parameters())


def sizes(cfg: Config) -> dict[str, dict[str, int]]:
    """axis -> point label -> its size on that axis (pairs, or parameters)."""
    full = cfg.data.world.train_pairs
    return {
        "pairs": {str(n): n for n in pair_counts(full)},
        "towers": {towers: tower_parameters(cfg, towers) for towers in TOWERS},
        "third": {third: third_parameters(cfg, third) for third in THIRD},
    }


def _label(axis: str, point: Point) -> str:
    return {"pairs": str(point.pairs), "towers": point.towers, "third": point.third}[axis]


# ------------------------------------------------------------------------ report
def records_of(cfg: Config, out: Path, size_of: dict) -> list[dict]:
    """One record per run and axis it lies on, in the grid's schema plus ``size_axis``,
    ``size`` (pairs or parameters) and ``size_label``; the base point is on every axis."""
    records = []
    full = cfg.data.world.train_pairs
    for seed in range(cfg.reproduce.seeds):
        for method in ("clip", "lit", "3t"):
            for axis, points in axis_points(full, method, seed).items():
                for point in points:
                    run_dir = Path(run_config(cfg, point, out).train.run_dir)
                    record = run_record(SETTING, method, seed, run_dir)
                    label = _label(axis, point)
                    records.append(
                        {"size_axis": axis, "size": size_of[axis][label], "size_label": label}
                        | record
                    )
    return records


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curves(records: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """axis -> method -> points (size order): size, label, and per metric (mean, std)."""
    out: dict[str, dict[str, list[dict]]] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["size_axis"], r["method"], r["size"], r["size_label"]), []).append(r)
    for (axis, method, size, label), runs in sorted(groups.items(), key=lambda kv: kv[0][2]):
        point = {"size": size, "size_label": label, "seeds": len(runs)}
        point |= {k: _spread([r[k] for r in runs]) for k in HEADLINE}
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
                mean, std = _spread(per_seed)
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


def step_check(cfg: Config, out: Path, records: list[dict], size_of: dict) -> list[dict]:
    """Per method and metric: the largest run at its steps and at 1.5x, with the seed
    spread at that point; "step-limited" when the longer run gains more than the spread."""
    full = cfg.data.world.train_pairs
    rows = []
    for method in ("clip", "lit", "3t"):
        longer = Point(full, "L", method=method, longer=True)
        run_dir = Path(run_config(cfg, longer, out).train.run_dir)
        if not (run_dir / "eval.json").exists():
            continue
        long_scores = json.loads((run_dir / "eval.json").read_text())
        size = size_of["towers"]["L"]
        at = [
            r
            for r in records
            if (r["size_axis"], r["method"], r["size"]) == ("towers", method, size)
        ]
        for metric in HEADLINE:
            mean, std = _spread([r[metric] for r in at])
            seed0 = next(r[metric] for r in at if r["seed"] == 0)
            gain = long_scores[metric] - seed0
            rows.append(
                {
                    "method": method,
                    "metric": metric,
                    "steps": cfg.train.steps,
                    "longer_steps": round(cfg.train.steps * STEP_CHECK_FACTOR),
                    "seed0": seed0,
                    "longer": long_scores[metric],
                    "gain": gain,
                    "seed_std": std,
                    "status": "step-limited" if gain > std else "not step-limited",
                }
            )
    return rows


def markdown(curve: dict, checks: list[dict], gains_clip: dict, steps: list[dict], cfg) -> str:
    lines = [
        "# Scaling: does 3T gain more than LiT from scale?",
        "",
        f"CLIP, LiT and 3T (third tower EfficientNet-Lite0 unless the axis varies it), "
        f"{cfg.train.steps} steps each, batch {cfg.data.batch_size}; mean ± standard deviation "
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
    if steps:
        lines += [
            "",
            "## Are the largest runs step-limited?",
            "",
            "The L towers on every pair, seed 0, trained again for 1.5x the steps.",
            "",
            "| method | metric | at the steps | at 1.5x | gain | seed std | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in steps:
            lines.append(
                f"| {METHOD_NAMES[s['method']]} | {LABELS[s['metric']]} | {s['seed0']:.1f} | "
                f"{s['longer']:.1f} | {s['gain']:+.1f} | {s['seed_std']:.1f} | {s['status']} |"
            )
    return "\n".join(lines) + "\n"


def plot(curve: dict, metric: str, path: Path) -> None:
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
        if "clip" not in methods and "clip" in curve.get("towers", {}):
            base = next(p for p in curve["towers"]["clip"] if p["size_label"] == "M")
            ax.axhline(base[metric][0], color=colours["clip"], ls="--", label="CLIP (no h)")
        ax.set_xscale("log", base=2)
        # ticks at the sizes trained, named as the runs are (Lite1 and Lite2 are only 1.2x
        # and 1.3x Lite0: powers of two would leave that axis bare)
        points = next(iter(methods.values()))
        names = [p["size_label"].replace("efficientnet_lite", "Lite") for p in points]
        ax.set_xticks([p["size"] for p in points], names)
        ax.minorticks_off()
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.set_ylabel(f"{LABELS[metric]} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)


def write_report(out: Path, cfg: Config, records: list[dict], steps: list[dict]) -> dict:
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
        "step_check": steps,
        "config": cfg.model_dump(mode="json"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(curve, checks, vs_clip, steps, cfg))
    for metric in HEADLINE:
        plot(curve, metric, out / f"scaling_{metric.replace('@', '')}.png")
    return results


def scaling(cfg: Config, out: str | Path, progress: bool = True) -> dict:
    """Train and evaluate every run of the experiment; write the report to ``out``."""
    names = {point.name for point in plan(cfg.data.world.train_pairs, cfg.reproduce.seeds)}

    def describe(job: Job, result) -> str:
        if job.name not in names:
            return f"{job.name} ready"
        scores = json.loads((Path(job.args[0].train.run_dir) / "eval.json").read_text())
        return f"{job.name:<36} " + "  ".join(f"{k} {scores[k]:5.1f}" for k in HEADLINE)

    out = Path(out)
    run_experiment(cfg, out, jobs, describe, "scaling", progress)
    size_of = sizes(cfg)
    records = records_of(cfg, out, size_of)
    return write_report(out, cfg, records, step_check(cfg, out, records, size_of))
