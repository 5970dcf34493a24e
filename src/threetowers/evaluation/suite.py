"""Evaluate a model on its benchmarks: zero-shot, retrieval, few-shot probe, the α-sweep.

LiT is evaluated with its locked tower and g, CLIP and 3T with (f, g); for 3T the α-sweep
also scores the convex combination with each frozen tower's pair (z_k, z_gk) and each frozen
pair's own score (u_pimg, u_ptxt). Metric names are flat (``zeroshot_top1``, ``i2t_R@1``,
…); the first zero-shot set is the primary one, others are prefixed with their name
(``benchmark_sets.py``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from threetowers.config import EvalConfig
from threetowers.data.benchmarks import RetrievalSet
from threetowers.data.sources.bad_samples import BadSampleLog
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.evaluation import metrics
from threetowers.evaluation.benchmark_sets import Benchmarks, metric_names
from threetowers.evaluation.embedding import embed_images, embed_texts
from threetowers.evaluation.inputs import EvalCache
from threetowers.evaluation.mixture import Mixture
from threetowers.files.atomic import write_atomic
from threetowers.model.three_towers import ThreeTowers

log = logging.getLogger(__name__)


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


def _captions_of(retrieval: RetrievalSet, kept: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The captions of the ``kept`` images, each pointing at its image's row among them."""
    owners = retrieval.image_of_caption
    row = torch.full((len(retrieval),), -1, dtype=torch.long)
    row[kept] = torch.arange(len(kept))
    mine = row[owners] >= 0
    captions = [caption for caption, keep in zip(retrieval.captions, mine, strict=True) if keep]
    return captions, row[owners[mine]]


def _merge(sweeps: dict[tuple[float, ...], dict], rows: list[dict]) -> None:
    for row in rows:
        sweeps.setdefault(row["weights"], {}).update(
            {k: v for k, v in row.items() if k != "weights"}
        )
