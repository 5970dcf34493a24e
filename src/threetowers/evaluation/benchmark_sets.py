"""The benchmark sets a run is evaluated on, by name, and how their metrics are named: the
first set of each kind is the primary one (``i2t_R@1``, ``zeroshot_top1``), the others carry
their name (``i2t_heldout_R@1``, ``zeroshot_places_top1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from threetowers.config import EvalConfig
from threetowers.data.benchmarks import (
    ClassificationSet,
    RetrievalSet,
    load_class_folder,
    load_karpathy,
)


@dataclass
class Benchmarks:
    """The sets to evaluate on, by name; the first of each kind is the primary one."""

    retrieval: dict[str, RetrievalSet] = field(default_factory=dict)
    zeroshot: dict[str, ClassificationSet] = field(default_factory=dict)
    fewshot_train: ClassificationSet | None = None  # labelled shots for the primary set


def resolve_benchmarks(
    cfg: EvalConfig,
    defaults: dict[str, dict[str, str]] | None,
    allow_absolute_paths: bool = False,
) -> Benchmarks:
    """The configured benchmarks; where ``eval.retrieval`` or ``eval.zeroshot`` is left empty,
    the ``defaults`` of that kind (``{"retrieval": {name: Karpathy JSON}, "zeroshot": {name:
    class folders}}``: the embedded world's own sets, which ``project.world.default.ensure_world``
    names, so that evaluation knows nothing of the world)."""
    retrieval = cfg.retrieval if isinstance(cfg.retrieval, dict) else {}
    if isinstance(cfg.retrieval, str):
        retrieval = {"retrieval": cfg.retrieval}
    zeroshot = dict(cfg.zeroshot)
    if defaults is not None:
        retrieval = retrieval or dict(defaults["retrieval"])
        zeroshot = zeroshot or dict(defaults["zeroshot"])
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
