"""What each ``threetowers`` command does: the trainer's commands (config, summary, train,
eval, cache) and the apps' and the project's (embed, index, serve, analyze, export, pretrain,
reproduce), each importing its part of the package only when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from threetowers.config import ConfigError, load_config, load_experiment_config
from threetowers.distributed import launched_rank
from threetowers.evaluation.chance import results_table
from threetowers.files.readback import read_json
from threetowers.model.build import build_model


def _config(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")


def _summary(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg, device="meta")
    print(f"mode {model.mode}, embedding dim {model.embed_dim}, loss {cfg.loss.kind}")
    parts = {"image tower f": model.image_tower, "text tower g": model.text_tower}
    parts |= {f"head W_{name}": head for name, head in model.heads.items()}
    parts["temperatures"] = model.loss_fn
    for name, part in parts.items():
        if part is not None:
            print(f"  {name:<16} {sum(p.numel() for p in part.parameters()):>14,} trainable")
    for name, tower in model.frozen.items():
        frozen = sum(p.numel() for p in tower.parameters())
        label = f"frozen tower {name}"
        print(f"  {label:<16} {frozen:>14,} frozen ({tower.name}, {tower.feature_dim}-d features)")
        if name in model.structure.text:
            pooling = "the pair's own" if model.structure.is_side(name) else tower.pooling
            print(f"    reads captions: {pooling} pooling, up to {tower.max_length} tokens")
        else:
            print(f"    preprocessing: {tower.preprocessing}")
    print(f"  total trainable  {sum(p.numel() for p in model.trainable_parameters()):>14,}")


def _train(args: argparse.Namespace) -> None:
    from threetowers.trainer.loop import Stopped, train

    cfg = load_config(args.config, args.overrides)
    try:
        run_dir = train(cfg, args.run_dir, progress=not args.quiet)
    except Stopped as stopped:  # asked to stop, and stopped cleanly: a success
        if launched_rank() == 0:
            print(f"threetowers train: {stopped}; re-run the same command to resume")
        return
    if launched_rank() == 0:  # under torchrun, one table
        _print_results(run_dir)


def _print_results(run_dir: Path) -> None:
    results = read_json(run_dir / "eval.json")
    chance = read_json(run_dir / "chance.json")
    print(f"\nresults of {run_dir} (%, {results.get('mode', '')}):")
    print(results_table(results, chance))


# What `eval` may override besides eval.*: how the benchmarks are read, never the model.
EVAL_DATA_KEYS = (
    "data.max_bad_fraction",
    "data.num_workers",
    "data.cache_dir",
    "data.allow_absolute_paths",
)


def _eval(args: argparse.Namespace) -> None:
    from threetowers.model.trained import load_trained
    from threetowers.trainer.trained import evaluate_trained

    run = load_trained(args.run)
    foreign = [
        item
        for item in args.overrides
        if not item.startswith("eval.") and item.split("=", 1)[0] not in EVAL_DATA_KEYS
    ]
    if foreign:
        raise ConfigError(
            f"eval takes eval.* overrides and the data-reading keys {', '.join(EVAL_DATA_KEYS)} "
            f"only (the model is fixed), got {foreign}"
        )
    cfg = load_config(run.run_dir / "config.yaml", args.overrides)
    out = Path(args.out) if args.out else run.run_dir
    results, chance = evaluate_trained(run, cfg, out)
    print(f"step {run.step} of {run.run_dir}; eval.json in {out}")
    print(results_table(results, chance))


def _embed(args: argparse.Namespace) -> None:
    from threetowers.apps.embed import embed, parse_alpha, save_embeddings
    from threetowers.model.trained import load_trained

    run = load_trained(args.run)
    vectors, keys = embed(
        run.model,
        run.tokenizer,
        args.images,
        args.texts,
        parse_alpha(args.alpha),
        max_bad_fraction=run.cfg.data.max_bad_fraction,
    )
    save_embeddings(args.out, vectors, keys)
    print(f"{len(keys)} embeddings of dim {vectors.shape[1]} -> {args.out}")


def _index(args: argparse.Namespace) -> None:
    from threetowers.apps.search.build import build_index
    from threetowers.apps.search.items import index_source
    from threetowers.data.sources.fields import Fields
    from threetowers.model.trained import load_trained

    run = load_trained(args.run)
    data = run.cfg.data
    fields = Fields(data.image_key, data.caption_key)
    source = index_source(args.images, args.data, args.split, data.allow_absolute_paths, fields)
    manifest = build_index(
        run,
        source,
        args.out,
        dtype=args.dtype,
        kind=None if args.ann == "auto" else args.ann,
        exact_below=args.exact_below,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.quiet,
    )
    ann = manifest["ann"]
    recall = f", recall@10 {ann['recall_at_10']:.3f} ({ann['params']})" if ann["params"] else ""
    captions = f" and {manifest['captions']} captions" if manifest["captions"] else ""
    print(f"{manifest['images']} images{captions} of {source.description} -> {args.out}")
    print(f"  {manifest['dtype']} vectors, {ann['kind']} FAISS index{recall}")
    if manifest["float16_recall_at_10"] is not None:
        print(f"  float16 vs float32: recall@10 {manifest['float16_recall_at_10']:.4f}")
    print(f"search it: threetowers serve {args.out}")


def _serve(args: argparse.Namespace) -> None:
    from threetowers.apps.search.server import serve

    serve(args.index, args.host, args.port, args.run)


def _analyze(args: argparse.Namespace) -> None:
    from threetowers.apps.analysis.analyze import analyze, report

    results = analyze(args.run, args.out)
    print(report(results), end="")


def _export(args: argparse.Namespace) -> None:
    from threetowers.apps.export.open_clip import export_open_clip

    config = export_open_clip(args.run, args.out, args.alpha)
    exported = config["threetowers"]
    print(f"{args.run} (step {exported['step']}, {exported['mode']}) -> {args.out}")
    print(f"  holds {exported['holds']}")
    if exported["not_held"]:
        print(f"  not held: {exported['not_held']}")
    print(f"load it: open_clip.create_model_and_transforms('local-dir:{args.out}')")


def _cache(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from threetowers import distributed
    from threetowers.data.caches.layout import CacheSpec
    from threetowers.data.caches.sharded import build_dataset_caches
    from threetowers.data.caches.units import dataset_units
    from threetowers.data.pipeline import open_training_pairs
    from threetowers.model.build import build_frozen_towers, structure_of
    from threetowers.project.world.default import default_world

    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    device = distributed.local_device(distributed.resolve_device(cfg.train.device))
    towers = {name: tower.to(device) for name, tower in build_frozen_towers(cfg.model).items()}
    if not towers:
        raise ConfigError("mode 'clip' has no frozen tower to cache; use model.mode=3t or lit")
    text = structure_of(cfg.model).text
    created_group = distributed.init_from_env(device)  # under torchrun: each rank its share
    try:
        with distributed.main_first():  # rank 0 makes the embedded world, when it is the data
            pairs, _ = open_training_pairs(cfg, default_world(cfg))
        units = dataset_units(pairs)
        spec = CacheSpec(data.cache_dir, data.cache_dtype, precision=data.cache_precision)
        caches, captions = build_dataset_caches(
            {name: tower for name, tower in towers.items() if name not in text},
            {name: towers[name] for name in text},
            units,
            spec,
            data.batch_size,
            data.num_workers,
            progress=distributed.is_main(),
            max_bad_fraction=data.max_bad_fraction,
        )
    finally:
        if created_group:
            dist.destroy_process_group()
    if launched_rank() == 0:  # under torchrun, one report
        for name, cache in caches.items():
            what = f"{len(cache)} feature vectors"
            _report_cache(name, cache, what, len(units), data.cache_dir)
        for name, cache in captions.items():
            what = "the captions' feature vectors"
            _report_cache(name, cache, what, len(units), data.cache_dir)


def _report_cache(name: str, cache, what: str, units: int, cache_dir: str) -> None:
    folder = Path(cache.units[0].npy).parent if cache.units else cache_dir
    print(f"{name}: {what} of dim {cache.dim} ({cache.dtype}) in {units} unit(s) under {folder}")


def _pretrain(args: argparse.Namespace) -> None:
    from threetowers.project.experiments.pretrain import pretrain

    out = pretrain(load_experiment_config(args.config, args.overrides), progress=not args.quiet)
    report = read_json(out.with_suffix(".json"))
    print(
        f"classifier ({report['classes']} classes, val top-1 {report['val_top1']:.1f}%) -> "
        f"{out}; use it with model.frozen.0.backbone=checkpoint model.frozen.0.path={out}"
    )


def _reproduce(args: argparse.Namespace) -> None:
    from threetowers.project.experiments.distill import distill
    from threetowers.project.experiments.open_vocab import open_vocab
    from threetowers.project.experiments.reproduce import quick, reproduce
    from threetowers.project.experiments.scaling import scaling

    experiments = {
        "paper": reproduce,
        "open-vocab": open_vocab,
        "scaling": scaling,
        "distill": distill,
    }
    cfg = load_experiment_config(args.config, args.overrides)
    if args.quick:
        cfg = quick(cfg)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
        cfg = cfg.model_copy(
            update={"reproduce": cfg.reproduce.model_copy(update={"seeds": args.seeds})}
        )
    out = Path(args.out or f"runs/{'reproduce' if args.experiment == 'paper' else args.experiment}")
    experiments[args.experiment](cfg, out, progress=not args.quiet)
    print((out / "results.md").read_text(), end="")
    figures = ", ".join(sorted(path.name for path in out.glob("*.png")))
    print(f"\nresults.json, results.md and {figures} are in {out}")


HANDLERS = {
    "config": _config,
    "summary": _summary,
    "train": _train,
    "eval": _eval,
    "embed": _embed,
    "index": _index,
    "serve": _serve,
    "analyze": _analyze,
    "export": _export,
    "cache": _cache,
    "pretrain": _pretrain,
    "reproduce": _reproduce,
}
