"""The ``threetowers`` command. Every mistake a user can make ends in one message, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from threetowers.build import build_model
from threetowers.config import ConfigError, load_config, preset_names
from threetowers.eval_suite import results_table


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
    if model.third_tower is not None:
        h = model.third_tower
        frozen = sum(p.numel() for p in h.parameters())
        print(f"  third tower h    {frozen:>14,} frozen ({h.name}, {h.feature_dim}-d features)")
        print(f"    preprocessing: {h.preprocessing}")
    print(f"  total trainable  {sum(p.numel() for p in model.trainable_parameters()):>14,}")


def _train(args: argparse.Namespace) -> None:
    from threetowers.train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, args.run_dir, progress=not args.quiet)
    _print_results(run_dir)


def _print_results(run_dir: Path) -> None:
    results = json.loads((run_dir / "eval.json").read_text())
    chance = json.loads((run_dir / "chance.json").read_text())
    print(f"\nresults of {run_dir} (%, {results.get('mode', '')}):")
    print(results_table(results, chance))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="threetowers", description="Three Towers (3T), LiT and CLIP image-text training."
    )
    commands = root.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="print the resolved, validated config")
    _config_arguments(config)
    config.set_defaults(run=_config)
    summary = commands.add_parser("summary", help="build the model and count its parameters")
    _config_arguments(summary)
    summary.set_defaults(run=_summary)
    train = commands.add_parser(
        "train",
        help="train a model (re-run the same command to resume from the last checkpoint)",
    )
    _config_arguments(train)
    train.add_argument("--run-dir", help="where the run lives (default: train.run_dir)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=_train)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as error:
        print(f"threetowers {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
