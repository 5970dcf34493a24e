"""project/experiments/scaling_report.py, pure functions of the scaling experiment's records:
curves (mean and std per size), least-squares slopes of 3T - LiT over log2 size from each
seed's own differences, and the claim's verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from threetowers.project.experiments.report import HEADLINE
from threetowers.project.experiments.scaling_report import (
    curves,
    gain_slopes,
    slope,
    spread,
    verdicts,
)


def records(gaps_by_seed: dict[int, list[float]], sizes=(2500, 5000, 10000, 20000)) -> list:
    """3T at LiT + gap, LiT at 50 + seed; every metric alike."""
    out = []
    for seed, gaps in gaps_by_seed.items():
        for size, gap in zip(sizes, gaps, strict=True):
            for method, value in (("lit", 50.0 + seed), ("3t", 50.0 + seed + gap)):
                out.append(
                    {"size_axis": "pairs", "size": size, "size_label": str(size)}
                    | {"method": method, "seed": seed}
                    | {k: value for k in HEADLINE}
                )
    return out


def test_slope_is_least_squares():
    xs, ys = [1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 4.5, 5.0]
    assert slope(xs, ys) == pytest.approx(np.polyfit(xs, ys, 1)[0])


def test_slope_of_unevenly_spaced_points_is_least_squares():
    rng = np.random.default_rng(0)
    xs = np.log2([1000, 3000, 4000, 50000])
    ys = rng.normal(size=4)
    assert slope(list(xs), list(ys)) == pytest.approx(np.polyfit(xs, ys, 1)[0], rel=1e-12)


def test_spread_is_mean_and_sample_std():
    assert spread([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt((4 + 1 + 9) / 2)))
    assert spread([7.0]) == (7.0, 0.0)


def test_gain_slopes_pair_each_seed_and_verdicts_follow_the_spread():
    grows = records({0: [1.0, 2.0, 3.0, 4.0], 1: [0.0, 2.0, 4.0, 6.0], 2: [2.0, 2.5, 3.0, 3.5]})
    slopes = gain_slopes(grows, "3t", "lit")["pairs"]["i2t_R@1"]
    assert slopes["per_seed"] == pytest.approx([1.0, 2.0, 0.5])  # per doubling: log2 steps of 1
    assert slopes["mean"] == pytest.approx(3.5 / 3)
    assert slopes["std"] == pytest.approx(np.std([1.0, 2.0, 0.5], ddof=1))
    (check,) = [v for v in verdicts({"pairs": {"i2t_R@1": slopes}})]
    assert check["status"] == "holds" and check["slope_per_doubling"] == slopes["mean"]
    noisy = records({0: [0.0, 2.0, 4.0, 6.0], 1: [6.0, 4.0, 2.0, 0.0]})
    (tie,) = verdicts(
        {"pairs": {"zeroshot_top1": gain_slopes(noisy, "3t", "lit")["pairs"]["zeroshot_top1"]}}
    )
    assert tie["status"] == "tie"
    shrinks = records({0: [4.0, 3.0, 2.0, 1.0], 1: [4.0, 2.9, 2.0, 1.1]})
    (fails,) = verdicts(
        {"pairs": {"t2i_R@1": gain_slopes(shrinks, "3t", "lit")["pairs"]["t2i_R@1"]}}
    )
    assert fails["status"] == "fails"


def test_slopes_are_over_log2_of_uneven_sizes_from_each_seeds_own_gaps():
    sizes = (1000, 3000, 4000, 50000)
    gaps = {0: [0.0, 1.0, 1.5, 4.0], 1: [2.0, 1.0, 3.0, 2.0]}
    # the seeds' baselines differ (50 + seed): only each seed's own difference counts
    got = gain_slopes(records(gaps, sizes), "3t", "lit")["pairs"]["t2i_R@1"]
    xs = np.log2(sizes)
    expected = [np.polyfit(xs, gaps[seed], 1)[0] for seed in (0, 1)]
    assert got["per_seed"] == pytest.approx(expected, rel=1e-12)
    assert got["mean"] == pytest.approx(np.mean(expected))
    assert got["std"] == pytest.approx(np.std(expected, ddof=1))


def test_a_seed_missing_a_size_is_left_out_and_one_size_has_no_slope():
    full = records({0: [1.0, 2.0, 3.0, 4.0], 1: [0.0, 0.0, 0.0, 0.0]})
    lost = ("3t", 1, 5000)  # seed 1's 3T run at 5000 pairs
    partial = [r for r in full if (r["method"], r["seed"], r["size"]) != lost]
    got = gain_slopes(partial, "3t", "lit")["pairs"]["zeroshot_top1"]
    assert got["per_seed"] == pytest.approx([1.0]) and got["std"] == 0.0
    single = records({0: [1.0]}, sizes=(2500,))
    assert gain_slopes(single, "3t", "lit") == {"pairs": {}}
    assert verdicts({"pairs": {}}) == []


def test_an_axis_without_the_baseline_is_not_compared():
    towers = [r | {"size_axis": "towers"} for r in records({0: [1.0, 2.0, 3.0, 4.0]})]
    clip_free = [r for r in towers if r["method"] != "lit"]
    assert gain_slopes(clip_free, "3t", "lit") == {}


def test_curves_are_mean_and_std_per_size_in_method_order():
    curve = curves(records({0: [1.0, 2.0, 3.0, 4.0], 1: [3.0, 2.0, 1.0, 0.0]}))
    assert list(curve) == ["pairs"] and list(curve["pairs"]) == ["lit", "3t"]
    first = curve["pairs"]["3t"][0]
    assert first["size"] == 2500 and first["seeds"] == 2
    assert first["zeroshot_top1"] == pytest.approx((52.5, 3 / math.sqrt(2)))  # 51, 54


def test_curves_order_axes_methods_and_sizes_whatever_the_records_order():
    base = records({0: [1.0, 2.0, 3.0, 4.0]})
    third = [r | {"size_axis": "third"} for r in base]
    clip = [r | {"method": "clip", "size_axis": "towers"} for r in base if r["method"] == "lit"]
    shuffled = [*reversed(third), *clip, *reversed(base)]
    curve = curves(shuffled)
    assert list(curve) == ["pairs", "towers", "third"]
    assert list(curve["towers"]) == ["clip"] and list(curve["third"]) == ["lit", "3t"]
    assert [p["size"] for p in curve["third"]["3t"]] == [2500, 5000, 10000, 20000]
    assert [p["i2t_R@1"][0] for p in curve["pairs"]["3t"]] == [51.0, 52.0, 53.0, 54.0]
