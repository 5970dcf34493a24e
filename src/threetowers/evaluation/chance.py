"""What random embeddings would score on each benchmark set, exactly, and the table that
prints a run's results beside it.
"""

from __future__ import annotations

import torch

from threetowers.evaluation.benchmark_sets import Benchmarks, metric_names


def chance_levels(benchmarks: Benchmarks) -> dict[str, float]:
    """What random embeddings would score, in %, to print next to the results."""
    chance: dict[str, float] = {}
    for position, (name, retrieval) in enumerate(benchmarks.retrieval.items()):
        named = metric_names("retrieval", name, position)
        images = len(retrieval)
        per_image = torch.bincount(retrieval.image_of_caption, minlength=images)
        for k in (1, 5, 10):
            chance[named(f"t2i_R@{k}")] = 100 * min(1.0, k / images)  # its one image among N
            chance[named(f"i2t_R@{k}")] = 100 * image_to_text_chance(per_image.tolist(), k)
    for position, (name, dataset) in enumerate(benchmarks.zeroshot.items()):
        named = metric_names("zeroshot", name, position)
        classes = len(dataset.class_names)
        chance[named("zeroshot_top1")] = 100 / classes
        chance[named("zeroshot_top5")] = 100 * min(1.0, 5 / classes)
        if position == 0:
            chance["fewshot_top1"] = 100 / classes
    return chance


def image_to_text_chance(captions_per_image: list[int], k: int) -> float:
    """Image->text recall@k of random embeddings: an image with c of the M captions misses
    when its k top-ranked captions (a uniform draw without replacement) are all others',
    with probability C(M - c, k) / C(M, k); the mean over images of the hit probability."""
    total = sum(captions_per_image)
    hits = []
    for own in captions_per_image:
        miss = 1.0  # C(M - c, k) / C(M, k) as a product, exact in floats for any M
        for j in range(min(k, total)):
            miss *= max(0, total - own - j) / (total - j)
        hits.append(1.0 - miss)
    return sum(hits) / len(hits)


def results_table(results: dict, chance: dict[str, float]) -> str:
    rows = [f"{'metric':<22}{'model':>9}{'chance':>9}"]
    for key, value in results.items():
        if isinstance(value, float) and key in chance:
            rows.append(f"{key:<22}{value:>9.1f}{chance[key]:>9.1f}")
    return "\n".join(rows)
