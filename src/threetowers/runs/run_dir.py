"""The run directory: resolved config, environment record, and guards for resuming."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch
import yaml

from threetowers.atomic import remove_temporaries, write_atomic
from threetowers.config import Config, ConfigError

RECORDED_PACKAGES = (
    "threetowers",
    "torch",
    "numpy",
    "tokenizers",
    "webdataset",
    "safetensors",
    "pydantic",
    "transformers",
)


def run_dir_of(cfg: Config, run_dir: str | Path | None) -> Path:
    """The run directory: the one given, else the config's train.run_dir."""
    return Path(run_dir if run_dir is not None else cfg.train.run_dir)


def prepare_run_dir(cfg: Config, run_dir: str | Path | None) -> Path:
    """Create the run directory, or check that an existing one was made by the same config."""
    run_dir = run_dir_of(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)  # one run per directory: whatever a killed run left is stale
    config_file = run_dir / "config.yaml"
    if config_file.exists() and not same_config(cfg, run_dir):
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({config_file}); resuming it with "
            "this one would mix two runs. Use a new run directory, or the same config to resume."
        )
    write_atomic(config_file, _resolved(cfg))
    write_atomic(run_dir / "environment.json", json.dumps(environment(), indent=1))
    return run_dir


def _resolved(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def same_config(cfg: Config, run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` was made with ``cfg`` (its config.yaml, resolved)."""
    return (run_dir / "config.yaml").read_text() == _resolved(cfg)


def environment() -> dict:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_revision": git_revision(),
        # The kernels' instruction set and the GPU: float rounding differs between them, so
        # runs of one experiment made on different machines may differ in the last digits.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def git_revision() -> str | None:
    """The revision of the checkout holding this package, with '+dirty' for local changes."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, check=True, timeout=10
        )
        return done.stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def drop_metrics_after(path: Path, step: int) -> None:
    """After a resume from ``step``, forget what a killed run logged beyond it, including
    a line it was killed in the middle of writing."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


class MetricsLog:
    """metrics.jsonl, plus TensorBoard event files when the tensorboard package is installed."""

    def __init__(self, run_dir: Path) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.board = None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            flat = record.get("eval", record)
            prefix = "eval/" if "eval" in record else "train/"
            for key, value in flat.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()
