"""Evaluate a model on its benchmarks: zero-shot, retrieval, few-shot probe, the α-sweep.

LiT is evaluated with its locked tower and g, CLIP and 3T with (f, g); for 3T the α-sweep
also scores the convex combination with each frozen tower's pair (z_k, z_gk). Metric names
are flat (``zeroshot_top1``, ``i2t_R@1``, …); the first zero-shot set is the primary one,
others are prefixed with their name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from threetowers.config import EvalConfig
from threetowers.data.benchmarks import (
    ClassificationSet,
    RetrievalSet,
    collate_images,
    load_class_folder,
    load_karpathy,
)
from threetowers.data.sources.bad_samples import BadDataError, BadSampleLog
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.evaluation import metrics
from threetowers.evaluation.inputs import EvalCache, ImageInput, image_inputs
from threetowers.files.atomic import write_atomic
from threetowers.model.objective import Z_F, Z_G, Objective
from threetowers.model.three_towers import ThreeTowers
from threetowers.project.world.generate import RETRIEVAL_FILES

SWEEP_METRICS = ("zeroshot_top1", "i2t_R@1", "t2i_R@1")
log = logging.getLogger(__name__)


@dataclass
class Benchmarks:
    """The sets to evaluate on, by name; the first of each kind is the primary one."""

    retrieval: dict[str, RetrievalSet] = field(default_factory=dict)
    zeroshot: dict[str, ClassificationSet] = field(default_factory=dict)
    fewshot_train: ClassificationSet | None = None  # labelled shots for the primary set


def resolve_benchmarks(
    cfg: EvalConfig, world: dict | None, allow_absolute_paths: bool = False
) -> Benchmarks:
    """The configured benchmarks; with the embedded world and nothing configured, its own:
    retrieval and zero-shot in its training words, and again in held-out words
    (``project/world/heldout.py``)."""
    retrieval = cfg.retrieval if isinstance(cfg.retrieval, dict) else {}
    if isinstance(cfg.retrieval, str):
        retrieval = {"retrieval": cfg.retrieval}
    zeroshot = dict(cfg.zeroshot)
    if world is not None:
        root = Path(world["root"])
        retrieval = retrieval or {
            name: str(root / "retrieval" / file) for name, file in RETRIEVAL_FILES.items()
        }
        zeroshot = zeroshot or {
            "objects": str(root / "zeroshot_objects"),
            "places": str(root / "zeroshot_places"),
            "heldout": str(root / "zeroshot_objects_heldout"),
        }
    sets = Benchmarks()
    for name, retrieval_json in retrieval.items():
        key = "eval.retrieval" if isinstance(cfg.retrieval, str) else f"eval.retrieval.{name}"
        try:
            sets.retrieval[name] = load_karpathy(
                retrieval_json,
                cfg.retrieval_images,
                split=cfg.retrieval_split,
                allow_absolute_paths=allow_absolute_paths,
            )
        except FileNotFoundError as error:
            fix = (
                "set eval.retrieval_images to the folder holding the images"
                if Path(retrieval_json).is_file()
                else "give a Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json)"
            )
            raise FileNotFoundError(f"{key}: {error}; {fix}, or leave {key} unset") from None
    for name, root in zeroshot.items():
        try:
            sets.zeroshot[name] = load_class_folder(root, cfg.zeroshot_split)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"eval.zeroshot.{name}: {error}; give a folder of class folders (ROOT/"
                f"{cfg.zeroshot_split or ''}/CLASS/*.jpg), or remove eval.zeroshot.{name}"
            ) from None
    if sets.zeroshot and cfg.fewshot_shots > 0 and cfg.zeroshot_split is not None:
        primary = Path(next(iter(zeroshot.values())))
        if (primary / "val").is_dir():
            sets.fewshot_train = load_class_folder(primary, "val")
    return sets


def metric_names(kind: str, name: str, position: int) -> Callable[[str], str]:
    """How a set's metrics are named: the primary set's plainly (``i2t_R@1``,
    ``zeroshot_top1``), another's with its name (``i2t_heldout_R@1``,
    ``zeroshot_places_top1``)."""
    if position == 0:
        return lambda key: key
    if kind == "retrieval":
        return lambda key: key.replace("_R@", f"_{name}_R@")
    return lambda key: key.replace("zeroshot", f"zeroshot_{name}")


@torch.no_grad()
def embed_images(
    model: ThreeTowers,
    paths,
    batch_size: int = 256,
    bad_images: BadSampleLog | None = None,
    cache: EvalCache | None = None,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Every image-side embedding of ``model`` (z_f and/or z_h) for image files.

    Images that cannot be used are skipped (and recorded in ``bad_images``): ``"index"``
    holds the positions in ``paths`` of the rows that were embedded. With ``cache``, the
    views and the frozen towers' features are made once and read from there (the same
    embeddings).
    ``num_workers`` loader processes read the rows (in order: the same embeddings).
    """
    inputs = image_inputs(model, paths, batch_size, cache)
    example = f"e.g. {paths[0]}" if len(paths) else ""
    return embed_inputs(model, inputs, batch_size, bad_images, num_workers, example)


@torch.no_grad()
def embed_inputs(
    model: ThreeTowers,
    inputs: dict[str, ImageInput],
    batch_size: int = 256,
    bad_images: BadSampleLog | None = None,
    num_workers: int = 0,
    example: str = "",
) -> dict[str, torch.Tensor]:
    """:func:`embed_images` on inputs made already (``image_inputs``, ``decoded_inputs``)."""
    device = next(p for p in model.parameters()).device
    loaders = {
        name: DataLoader(
            put.rows, batch_size=batch_size, collate_fn=collate_images, num_workers=num_workers
        )
        for name, put in inputs.items()
    }
    chunks: dict[str, list[torch.Tensor]] = {"index": []}
    for batches in zip(*loaders.values(), strict=True):
        indices, _, skipped = batches[0]  # every input reads the same files
        if bad_images is not None:
            bad_images.record(len(indices), skipped)
        if not len(indices):
            continue
        chunks["index"].append(indices)
        arguments: dict = {"images": None, "frozen_features": {}, "frozen_images": {}}
        for name, (_, rows, _) in zip(loaders, batches, strict=True):
            tensor = inputs[name].prepare(rows).to(device)
            argument, _, tower = name.partition("/")  # frozen_features/NAME -> its dict
            if tower:
                arguments[argument][tower] = tensor
            else:
                arguments[argument] = tensor
        for key, value in model.image_embeddings(**arguments).items():
            chunks.setdefault(key, []).append(value.float().cpu())
    if not chunks["index"]:
        rows = len(next(iter(inputs.values())).rows)
        raise BadDataError(f"none of the {rows} images could be used {example}".rstrip())
    return {key: torch.cat(values) for key, values in chunks.items()}


@torch.no_grad()
def embed_texts(model: ThreeTowers, tokenizer: CaptionTokenizer, texts, batch_size: int = 256):
    device = next(p for p in model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(texts), batch_size):
        captions = list(texts[start : start + batch_size])
        tokens = tokenizer.encode(captions).to(device)
        for key, value in model.text_embeddings(tokens, captions).items():
            chunks.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in chunks.items()}


def evaluate_model(
    model: ThreeTowers,
    tokenizer: CaptionTokenizer,
    benchmarks: Benchmarks,
    cfg: EvalConfig,
    out_dir: str | Path | None = None,
    step: int | None = None,
    max_bad_fraction: float = 1.0,
    cache: EvalCache | None = None,
    num_workers: int = 0,
    extra: dict | None = None,
) -> dict:
    """All metrics of ``model`` on ``benchmarks``, and ``extra`` ones measured elsewhere
    (validation); writes eval.json (and the α plot) to out_dir.

    Unusable images are left out of their set (a retrieval image with its captions) and
    counted in ``skipped_images``; more than ``max_bad_fraction`` of them is an error. With
    ``cache``, what every run would make again is made once (see ``eval_inputs``). Images
    are read by ``num_workers`` loader processes (0: in this one)."""
    was_training = model.training
    model.eval()
    image_key, text_key = model.image_key, model.structure.text_key
    mixture = Mixture.of(model) if cfg.alpha_sweep else None
    results: dict = {"mode": model.mode, "step": step}
    sweeps: dict[tuple[float, ...], dict] = {}
    bad_images = BadSampleLog(max_bad_fraction, "evaluation images")

    by_files: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def embed(paths) -> dict[str, torch.Tensor]:
        """Each list of image files once: sets that share images (the world's held-out sets
        link to the ordinary ones) share their embeddings."""
        files = tuple(os.path.realpath(path) for path in paths)
        if files not in by_files:
            by_files[files] = embed_images(
                model, paths, cfg.batch_size, bad_images, cache, num_workers
            )
            bad_images.check()  # benchmark sets are small: judged as each one is read
        return by_files[files]

    for position, (name, retrieval) in enumerate(benchmarks.retrieval.items()):
        named = metric_names("retrieval", name, position)
        images = embed(retrieval.image_paths)
        captions, image_of_text = _captions_of(retrieval, images["index"])
        texts = embed_texts(model, tokenizer, captions, cfg.batch_size)
        scores = metrics.retrieval(images[image_key], texts[text_key], image_of_text)
        results |= {named(k): v for k, v in scores.items()}
        if mixture is not None:
            rows = mixture.sweep(
                images, texts, lambda i, t, owners=image_of_text: metrics.retrieval(i, t, owners)
            )
            _merge(sweeps, [{named(k): v for k, v in row.items()} for row in rows])

    for position, (name, dataset) in enumerate(benchmarks.zeroshot.items()):
        named = metric_names("zeroshot", name, position)
        images = embed(dataset.image_paths)
        labels = dataset.labels[images["index"]]
        classes = {
            key: metrics.class_embeddings(
                lambda prompts, key=key: embed_texts(model, tokenizer, prompts, cfg.batch_size)[
                    key
                ],
                dataset.class_names,
                dataset.templates,
            )
            for key in (mixture.text_parts if mixture is not None else (text_key,))
        }
        scores = metrics.zeroshot(images[image_key], classes[text_key], labels)
        results |= {named(k): v for k, v in scores.items()}
        if mixture is not None:
            rows = mixture.sweep(
                images, classes, lambda i, c, labels=labels: metrics.zeroshot(i, c, labels)
            )
            _merge(sweeps, [{named(k): v for k, v in row.items()} for row in rows])
        if position == 0 and benchmarks.fewshot_train is not None:
            train = benchmarks.fewshot_train
            embedded = embed(train.image_paths)
            train_labels = train.labels[embedded["index"]]
            # Never more shots than the smallest class holds (tiny worlds in tests).
            classes_held = torch.bincount(train_labels, minlength=len(train.class_names))
            shots = min(cfg.fewshot_shots, int(classes_held.min()))
            if shots > 0:
                results["fewshot_top1"] = metrics.linear_probe(
                    embedded[image_key], train_labels, images[image_key], labels, shots=shots
                )
            results["fewshot_shots"] = shots

    if sweeps:
        results[mixture.key] = mixture.rows(sweeps)
    results |= extra or {}
    results["skipped_images"] = bad_images.total
    if bad_images.total:
        log.warning(bad_images.summary())
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "eval.json", json.dumps(results, indent=1))
        if sweeps:
            mixture.plot(results[mixture.key], out_dir)
    model.train(was_training)
    return results


@dataclass(frozen=True)
class Mixture:
    """The convex combination that ``eval`` sweeps: the main pair (z_f, z_g) and each aligned
    frozen tower's pair (z_k, z_gk). One tower: α from 0 to 1 in tenths (``alpha_sweep``,
    ``alpha_sweep.png``); more: every weight vector in tenths (``alpha_grid``, and for two
    towers the heat maps ``alpha_grid.png``)."""

    structure: Objective

    @classmethod
    def of(cls, model: ThreeTowers) -> Mixture | None:
        return cls(model.structure) if model.structure.aligned else None

    @property
    def towers(self) -> tuple[str, ...]:
        return self.structure.aligned

    @property
    def image_parts(self) -> tuple[str, ...]:
        return (Z_F, *(self.structure.pair(tower)[0] for tower in self.towers))

    @property
    def text_parts(self) -> tuple[str, ...]:
        return (Z_G, *(self.structure.pair(tower)[1] for tower in self.towers))

    @property
    def key(self) -> str:
        return "alpha_sweep" if len(self.towers) == 1 else "alpha_grid"

    def grid(self) -> list[tuple[float, ...]]:
        if len(self.towers) == 1:  # as alpha_sweep has always computed its weights
            return [(a, 1.0 - a) for a in metrics.DEFAULT_ALPHAS]
        return metrics.simplex_grid(1 + len(self.towers))

    def sweep(self, images: dict, texts: dict, metric_fn) -> list[dict]:
        image_parts = [images[part] for part in self.image_parts]
        text_parts = [texts[part] for part in self.text_parts]
        return metrics.mixture_sweep(image_parts, text_parts, metric_fn, self.grid())

    def rows(self, sweeps: dict[tuple[float, ...], dict]) -> list[dict]:
        """eval.json's rows: ``{"alpha": a_f, ...}`` (one tower, a_f ascending) or
        ``{"weights": {"f": a_f, k: a_k, ...}, ...}`` (grid order)."""
        if len(self.towers) == 1:
            return [{"alpha": w[0]} | row for w, row in sorted(sweeps.items())]
        parts = ("f", *self.towers)
        return [{"weights": dict(zip(parts, w, strict=True))} | row for w, row in sweeps.items()]

    def plot(self, rows: list[dict], out_dir: Path) -> None:
        present = [m for m in SWEEP_METRICS if m in rows[0]]
        if len(self.towers) == 1:
            metrics.plot_alpha_sweep({"3t": rows}, present, out_dir / "alpha_sweep.png")
        elif len(self.towers) == 2:
            metrics.plot_alpha_grid(rows, present, self.towers, out_dir / "alpha_grid.png")


def _captions_of(retrieval: RetrievalSet, kept: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The captions of the ``kept`` images, each pointing at its image's row among them."""
    owners = retrieval.image_of_caption
    row = torch.full((len(retrieval),), -1, dtype=torch.long)
    row[kept] = torch.arange(len(kept))
    mine = row[owners] >= 0
    captions = [caption for caption, keep in zip(retrieval.captions, mine, strict=True) if keep]
    return captions, row[owners[mine]]


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


def _merge(sweeps: dict[tuple[float, ...], dict], rows: list[dict]) -> None:
    for row in rows:
        sweeps.setdefault(row["weights"], {}).update(
            {k: v for k, v in row.items() if k != "weights"}
        )
