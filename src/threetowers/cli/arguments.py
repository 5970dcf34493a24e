"""Every ``threetowers`` command's arguments and their help (``threetowers COMMAND -h``)."""

from __future__ import annotations

import argparse

from threetowers.config import preset_names


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=f"a YAML file or a preset ({', '.join(preset_names())})")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. model.mode=lit"
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="threetowers", description="Three Towers (3T), LiT and CLIP image-text training."
    )
    commands = root.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="print the resolved, validated config")
    _config_arguments(config)
    summary = commands.add_parser("summary", help="build the model and count its parameters")
    _config_arguments(summary)
    train = commands.add_parser(
        "train",
        help="train a model (re-run the same command to resume from the last checkpoint)",
    )
    _config_arguments(train)
    train.add_argument("--run-dir", help="where the run lives (default: train.run_dir)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser(
        "eval", help="evaluate a run (zero-shot, retrieval, few-shot, alpha sweep for 3t)"
    )
    evaluate.add_argument("run", help="a run directory, or one of its checkpoints/step_N")
    evaluate.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.retrieval=F")
    evaluate.add_argument("--out", help="where eval.json goes (default: the run directory)")

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

    serve = commands.add_parser("serve", help="search an index in the browser (and over HTTP)")
    serve.add_argument("index", help="a directory written by `threetowers index`")
    serve.add_argument(
        "--host", default="127.0.0.1", help="the address to bind (default: loopback only)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--run", help="the run that built the index (default: its recorded path)")

    analysis = commands.add_parser(
        "analyze", help="CKA between a run's embeddings and linear probes of the world's attributes"
    )
    analysis.add_argument("run", help="a run directory")
    analysis.add_argument("--out", help="where analysis.json and .png go (default: RUN/analysis)")

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

    pretrain = commands.add_parser(
        "pretrain", help="train a classifier on class folders; the result serves as a third tower"
    )
    _config_arguments(pretrain)
    pretrain.add_argument("--quiet", action="store_true", help="no progress bar")

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
        choices=("paper", "open-vocab", "scaling", "distill"),
        default="paper",
        help="paper: CLIP vs LiT vs 3T in three settings (default); open-vocab: CLIP and 3T "
        "with the ImageNet tower, MiniLM or both, on queries in held-out words; scaling: "
        "CLIP, LiT and 3T over training pairs, tower size and the frozen tower's size; "
        "distill: a large 3T teacher, exported, taught into small students as a frozen pair",
    )
    repro.add_argument("--quick", action="store_true", help="one seed, short runs (a smoke run)")
    repro.add_argument("--seeds", type=int, help="seeds per run (default: reproduce.seeds)")
    repro.add_argument(
        "--out", help="where runs and results go (default: runs/reproduce, runs/EXPERIMENT)"
    )
    repro.add_argument("--quiet", action="store_true", help="no progress bar")

    cache = commands.add_parser(
        "cache",
        help="precompute the frozen towers' training features on train.device (under "
        "torchrun, each rank computes its share)",
    )
    _config_arguments(cache)
    return root
