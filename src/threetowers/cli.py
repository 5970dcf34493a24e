"""The ``threetowers`` command. Every mistake a user can make ends in one message, exit 2.

What counts as such a mistake: an invalid config or command line, a missing or unreadable
file, bad data beyond ``data.max_bad_fraction``, a file that is not what it claims to be, a
run that stopped on non-finite steps. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from threetowers.config import ConfigError, load_config, preset_names, refuse_repeated_keys
from threetowers.distributed import launched_rank
from threetowers.evaluation.suite import results_table
from threetowers.files.readback import read_json
from threetowers.model.build import build_model


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=f"a YAML file or a preset ({', '.join(preset_names())})")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. model.mode=lit"
    )


def _config(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")


def _summary(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg, device="meta")
    print(f"mode {model.mode}, embedding dim {model.embed_dim}, loss {cfg.loss.kind}")
    parts = {"image tower f": model.image_tower, "text tower g": model.text_tower}
    parts |= {f"head W_{name}": head for name, head in model.heads.items()}
    parts["temperatures"] = model.objective
    for name, part in parts.items():
        if part is not None:
            print(f"  {name:<16} {sum(p.numel() for p in part.parameters()):>14,} trainable")
    for name, tower in model.frozen.items():
        frozen = sum(p.numel() for p in tower.parameters())
        label = f"frozen tower {name}"
        print(f"  {label:<16} {frozen:>14,} frozen ({tower.name}, {tower.feature_dim}-d features)")
        if name in model.structure.text:
            print(f"    reads captions: {tower.pooling} pooling, up to {tower.max_length} tokens")
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
    from threetowers.trainer.trained import evaluate_trained, load_trained

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
    from threetowers.trainer.trained import load_trained

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
    from threetowers.trainer.trained import load_trained

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
    from threetowers.data.caches.captions import build_caption_caches
    from threetowers.data.caches.features import CacheSpec, build_caches
    from threetowers.data.caches.units import dataset_units
    from threetowers.data.pipeline import open_training_pairs
    from threetowers.model.build import build_frozen_towers, structure_of

    cfg = load_config(args.config, args.overrides)
    towers = build_frozen_towers(cfg.model)
    if not towers:
        raise ConfigError("mode 'clip' has no frozen tower to cache; use model.mode=3t or lit")
    text = structure_of(cfg.model).text
    pairs, *_ = open_training_pairs(cfg)
    units = dataset_units(pairs)
    spec = CacheSpec(cfg.data.cache_dir, cfg.data.cache_dtype)
    caches = build_caches(
        {name: tower for name, tower in towers.items() if name not in text},
        units,
        spec,
        cfg.data.batch_size,
        cfg.data.num_workers,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    captions = build_caption_caches(
        {name: towers[name] for name in text}, units, spec, cfg.data.batch_size
    )
    for name, cache in caches.items():
        what = f"{len(cache)} feature vectors"
        _report_cache(name, cache, what, len(units), cfg.data.cache_dir)
    for name, cache in captions.items():
        _report_cache(name, cache, "the captions' feature vectors", len(units), cfg.data.cache_dir)


def _report_cache(name: str, cache, what: str, units: int, cache_dir: str) -> None:
    folder = Path(cache.units[0].npy).parent if cache.units else cache_dir
    print(f"{name}: {what} of dim {cache.dim} ({cache.dtype}) in {units} unit(s) under {folder}")


def _pretrain(args: argparse.Namespace) -> None:
    from threetowers.project.experiments.pretrain import pretrain

    out = pretrain(load_config(args.config, args.overrides), progress=not args.quiet)
    report = read_json(out.with_suffix(".json"))
    print(
        f"classifier ({report['classes']} classes, val top-1 {report['val_top1']:.1f}%) -> "
        f"{out}; use it with model.third.backbone=checkpoint model.third.path={out}"
    )


def _reproduce(args: argparse.Namespace) -> None:
    from threetowers.project.experiments.open_vocab import open_vocab
    from threetowers.project.experiments.reproduce import quick, reproduce
    from threetowers.project.experiments.scaling import scaling

    experiments = {"paper": reproduce, "open-vocab": open_vocab, "scaling": scaling}
    cfg = load_config(args.config, args.overrides)
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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="threetowers", description="Three Towers (3T), LiT and CLIP image-text training."
    )
    commands = root.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="print the resolved, validated config")
    _config_arguments(config)
    config.set_defaults(handler=_config)
    summary = commands.add_parser("summary", help="build the model and count its parameters")
    _config_arguments(summary)
    summary.set_defaults(handler=_summary)
    train = commands.add_parser(
        "train",
        help="train a model (re-run the same command to resume from the last checkpoint)",
    )
    _config_arguments(train)
    train.add_argument("--run-dir", help="where the run lives (default: train.run_dir)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a run (zero-shot, retrieval, few-shot, alpha sweep for 3t)"
    )
    evaluate.add_argument("run", help="a run directory, or one of its checkpoints/step_N")
    evaluate.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.retrieval=F")
    evaluate.add_argument("--out", help="where eval.json goes (default: the run directory)")
    evaluate.set_defaults(handler=_eval)

    embed = commands.add_parser("embed", help="embed images or captions with a trained run")
    embed.add_argument("run", help="a run directory, or one of its checkpoints/step_N")
    embed.add_argument("--images", help="a directory of images (searched recursively)")
    embed.add_argument("--texts", help="a text file, one caption per line")
    embed.add_argument(
        "--alpha",
        default="1",
        help="3t only: < 1 (or weights by part, f=0.5,inet=0.3,scene=0.2) gives the "
        "convex-combination embeddings",
    )
    embed.add_argument("--out", required=True, help="output .safetensors or .npy")
    embed.set_defaults(handler=_embed)

    index = commands.add_parser(
        "index", help="embed a set of images with a trained run into a searchable index"
    )
    index.add_argument("run", help="a run directory, or one of its checkpoints/step_N")
    index.add_argument("--images", help="a directory of images (searched recursively)")
    index.add_argument(
        "--data",
        help="a Karpathy-split .json (images with captions), a CSV/TSV/JSONL table or "
        "webdataset shards",
    )
    index.add_argument("--split", default="test", help="the .json's split (default: test)")
    index.add_argument("--out", required=True, help="the index directory")
    index.add_argument(
        "--dtype", default="float16", choices=("float16", "float32"), help="stored vectors"
    )
    index.add_argument(
        "--exact-below",
        type=int,
        default=50_000,
        help="exact search below this many images (and captions), approximate (IVF) above",
    )
    index.add_argument(
        "--ann",
        default="auto",
        choices=("auto", "exact", "ivf", "hnsw"),
        help="the FAISS index (default auto: by --exact-below)",
    )
    index.add_argument(
        "--max-bad-fraction",
        type=float,
        help="stop when more of the images are unusable (default: the run's data.max_bad_fraction)",
    )
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(handler=_index)

    serve = commands.add_parser("serve", help="search an index in the browser (and over HTTP)")
    serve.add_argument("index", help="a directory written by `threetowers index`")
    serve.add_argument(
        "--host", default="127.0.0.1", help="the address to bind (default: loopback only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--run", help="the run that built the index (default: its recorded path)")
    serve.set_defaults(handler=_serve)

    analysis = commands.add_parser(
        "analyze", help="CKA between a run's embeddings and linear probes of the world's attributes"
    )
    analysis.add_argument("run", help="a run directory")
    analysis.add_argument("--out", help="where analysis.json and .png go (default: RUN/analysis)")
    analysis.set_defaults(handler=_analyze)

    export = commands.add_parser(
        "export", help="write a trained run in another library's format (OpenCLIP)"
    )
    export.add_argument("run", help="a run directory (or one of its checkpoints)")
    export.add_argument("--format", choices=["open_clip"], required=True)
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument(
        "--alpha",
        type=float,
        help="only 1 (f and g, the default): the mix with frozen towers stays in threetowers",
    )
    export.set_defaults(handler=_export)

    pretrain = commands.add_parser(
        "pretrain", help="train a classifier on class folders; the result serves as a third tower"
    )
    _config_arguments(pretrain)
    pretrain.add_argument("--quiet", action="store_true", help="no progress bar")
    pretrain.set_defaults(handler=_pretrain)

    repro = commands.add_parser(
        "reproduce",
        help="CLIP vs LiT vs 3T with matched, mismatched and ImageNet third towers, over seeds",
    )
    repro.add_argument(
        "--config", default="reproduce", help="a YAML file or a preset (default: reproduce)"
    )
    repro.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    repro.add_argument(
        "--experiment",
        choices=("paper", "open-vocab", "scaling"),
        default="paper",
        help="paper: CLIP vs LiT vs 3T in three settings (default); open-vocab: CLIP and 3T "
        "with the ImageNet tower, MiniLM or both, on queries in held-out words; scaling: "
        "CLIP, LiT and 3T over training pairs, tower size and the frozen tower's size",
    )
    repro.add_argument("--quick", action="store_true", help="one seed, short runs (a smoke run)")
    repro.add_argument("--seeds", type=int, help="seeds per run (default: reproduce.seeds)")
    repro.add_argument(
        "--out", help="where runs and results go (default: runs/reproduce, runs/EXPERIMENT)"
    )
    repro.add_argument("--quiet", action="store_true", help="no progress bar")
    repro.set_defaults(handler=_reproduce)

    cache = commands.add_parser("cache", help="precompute the frozen towers' training features")
    _config_arguments(cache)
    cache.set_defaults(handler=_cache)
    return root


class _Stderr(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is when they are written (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _log_to_stderr() -> None:
    """Warnings (bad samples, skipped steps) and summaries as ``threetowers: ...`` lines."""
    logger = logging.getLogger("threetowers")
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("threetowers: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    root = parser()
    # argparse stops filling a positional list at the first option, so overrides after
    # e.g. --quiet come back unparsed; they are still overrides.
    args, extra = root.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        root.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        refuse_repeated_keys(getattr(args, "overrides", []))
        args.handler(args)
    # ConfigError, BadDataError, CheckpointError and the loaders' errors are ValueErrors;
    # OSError covers missing files, permissions and a full disk; a run stopped by
    # non-finite steps raises FloatingPointError.
    except (ValueError, OSError, ImportError, FloatingPointError) as error:
        # Every torchrun rank reads the same config: rank 0 alone says what is wrong with it.
        if not (isinstance(error, ConfigError) and launched_rank() != 0):
            print(f"threetowers {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"threetowers {args.command}: interrupted; re-run the same command to resume "
            "(train resumes from its last checkpoint)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
