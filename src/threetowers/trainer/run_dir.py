"""The run directory: resolved config, environment record, and which config a start trains.

A run directory holds one run, made by one config. Once the run has a checkpoint, a start
with another config is refused (its exact resume needs the config it was made with), but
for a continuation: the same config with a larger ``train.steps``, which config.yaml then
records with the previous steps in ``train.continued_from`` (the learning-rate schedule of
the added steps: ``trainer.optim.continued_schedule``); a resume may also change the memory
and bookkeeping settings of :data:`RESUME_MAY_CHANGE`. Before its first checkpoint a run
holds nothing trained, so a start with another config replaces the old one, and what was
made for the old config (its tokenizer, its evaluation) is made again.

config.yaml is written by :func:`record_config` only once a start has opened its data and
every path it names: a start that fails on a wrong path leaves no config behind.

``train.precision: auto`` is the same config as a recorded ``fp32`` or ``bf16`` (every run made
before auto existed records fp32): the run keeps training in the precision it was made
with, so re-running the command that made it resumes it, on any device
(:func:`_trained_precision`).
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch
import yaml

from threetowers.config import Config, ConfigError, load_config
from threetowers.files.atomic import remove_temporaries, write_atomic
from threetowers.trainer.precision import resolve_precision

log = logging.getLogger(__name__)

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
# What a start makes for its config before the run's first checkpoint.
MADE_FOR_CONFIG = ("tokenizer.json", "tokenizer_sample.json", "eval.json")
# What a resume may change: memory and bookkeeping, never what is trained (micro-batches
# accumulate the whole batch's gradients exactly; a checkpointed block computes the same), so
# a run goes on on smaller GPUs, or checkpoints and logs more often. config.yaml records the
# new values.
RESUME_MAY_CHANGE = (
    "micro_batch",
    "activation_checkpointing",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
)


def run_dir_of(cfg: Config, run_dir: str | Path | None) -> Path:
    """The run directory: the one given, else the config's train.run_dir."""
    return Path(run_dir if run_dir is not None else cfg.train.run_dir)


def prepare_run_dir(cfg: Config, run_dir: Path, checkpoint_step: int | None) -> Config:
    """Create the run directory or admit this start to it (:func:`config_to_train`); returns
    the config it trains. A run without a checkpoint whose config changed loses what was made
    for the old one. Writes no config: :func:`record_config` does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)  # one run per directory: whatever a killed run left is stale
    admitted = config_to_train(cfg, run_dir, checkpoint_step)
    made = [name for name in MADE_FOR_CONFIG if (run_dir / name).exists()]
    if checkpoint_step is None and not same_config(admitted, run_dir):
        if not (run_dir / "config.yaml").exists() and made:
            # not ours to delete, nor to use: a resume would read them as the run's own
            raise ConfigError(
                f"{run_dir} holds {', '.join(made)} but no config.yaml, so they were not "
                "written by a run of threetowers (or by one killed before it began); move them "
                "away, or train in another run directory (data.tokenizer= uses a tokenizer)"
            )
        if made:
            log.info("%s has no checkpoint: its config is replaced by this one", run_dir)
        for name in made:
            (run_dir / name).unlink()
    return admitted


def config_to_train(cfg: Config, run_dir: Path, checkpoint_step: int | None) -> Config:
    """The config a start of ``run_dir`` with ``cfg`` trains, the run's latest checkpoint being
    at ``checkpoint_step`` (None: none). Without a checkpoint, ``cfg``. With one: the recorded
    config when ``cfg`` is that one (``train.continued_from`` may be left out), or its
    continuation when ``cfg`` differs only in a larger ``train.steps``; else a ConfigError.
    Either may change the settings of :data:`RESUME_MAY_CHANGE`. Either way in the precision
    the run was made with (:func:`_trained_precision`)."""
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        return cfg
    if checkpoint_step is None:  # nothing trained: another config replaces the recorded one
        recorded = _readable(config_file)
        if recorded is None or not _same(cfg, recorded):
            return cfg
        return _trained_precision(cfg, recorded, run_dir, rewritten=False)
    recorded = load_config(config_file)
    settings = {
        key: getattr(cfg.train, key)
        for key in RESUME_MAY_CHANGE
        if getattr(cfg.train, key) != getattr(recorded.train, key)
    }
    cfg = _with_train(cfg, {key: getattr(recorded.train, key) for key in settings})  # as made
    cfg = _with_train(
        cfg, {"continued_from": cfg.train.continued_from or recorded.train.continued_from}
    )
    before = recorded.train.steps
    admitted, continued = cfg, not _same(cfg, recorded)
    if continued:
        if not (cfg.train.steps > before and _same(_with_train(cfg, {"steps": before}), recorded)):
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({config_file}: "
                f"{', '.join(_differences(_as_recorded(cfg, recorded), recorded))} differ) and "
                f"a checkpoint of step {checkpoint_step}; resuming it with this one would mix "
                f"two runs. Use the same config to resume ({_may_change()} may differ), only a "
                "larger train.steps to continue it, or a new run directory "
                f"(train.init_from={run_dir} starts from its weights)"
            )
        log.info(
            "continuing %s from train.steps=%d to %d: the lr schedule restarts at step %d",
            run_dir,
            before,
            cfg.train.steps,
            before,
        )
        admitted = _with_train(cfg, {"continued_from": [*recorded.train.continued_from, before]})
    if settings:
        log.info(
            "%s goes on with %s (memory and bookkeeping: the same training)",
            run_dir,
            ", ".join(
                f"train.{key}={value} (was {getattr(recorded.train, key)})"
                for key, value in settings.items()
            ),
        )
    admitted = _with_train(admitted, settings)
    return _trained_precision(admitted, recorded, run_dir, rewritten=continued or bool(settings))


def _may_change() -> str:
    return ", ".join(f"train.{key}" for key in RESUME_MAY_CHANGE)


def record_config(cfg: Config, run_dir: Path) -> None:
    """Write the config this start trains and the environment it runs in. A config.yaml that
    reads as this config stays as written (perhaps in an earlier form of the keys): the run's
    fingerprint, which its search indexes hold, is taken from it."""
    if not same_config(cfg, run_dir):
        write_atomic(run_dir / "config.yaml", _resolved(cfg))
    write_atomic(run_dir / "environment.json", json.dumps(environment(), indent=1))


def _resolved(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _readable(config_file: Path) -> Config | None:
    """A run's recorded config, or None where it no longer reads as one."""
    try:
        return load_config(config_file)
    except ConfigError:
        return None


def _same(cfg: Config, recorded: Config) -> bool:
    """Whether ``cfg`` is the recorded config, ``train.precision: auto`` standing for the
    precision it records."""
    return _resolved(_as_recorded(cfg, recorded)) == _resolved(recorded)


def _as_recorded(cfg: Config, recorded: Config) -> Config:
    """``cfg`` with ``auto`` read as the recorded precision."""
    if cfg.train.precision != "auto":
        return cfg
    return _with_precision(cfg, recorded.train.precision)


def _trained_precision(cfg: Config, recorded: Config, run_dir: Path, rewritten: bool) -> Config:
    """``cfg`` (the recorded run, or its continuation) in the precision the run was made
    with. Under auto that is the recorded fp32 or bf16: a run is never switched part-way, so
    an fp32 run made before auto existed resumes on a GPU in fp32, said in one log line.
    auto stays where it already means the recorded precision on this device and config.yaml
    stays as written; a config.yaml ``rewritten`` (a continuation) records the precision."""
    if cfg.train.precision != "auto" or recorded.train.precision == "auto":
        return cfg
    made_in = recorded.train.precision
    auto_here = resolve_precision("auto", _device_type(cfg))
    if auto_here != made_in:
        log.info(
            "%s was made with train.precision=%s and goes on in it; train.precision=auto "
            "would be %s on this machine, which a new run directory gets",
            run_dir,
            made_in,
            auto_here,
        )
    elif not rewritten:
        return cfg
    return _with_precision(cfg, made_in)


def _device_type(cfg: Config) -> str:
    """The kind of device a start of ``cfg`` trains on, as ``distributed.resolve_device``
    picks it (train.device=cuda without a GPU is refused before any start)."""
    return "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"


def _with_precision(cfg: Config, precision: str) -> Config:
    return _with_train(cfg, {"precision": precision})


def _with_train(cfg: Config, values: dict) -> Config:
    """``cfg`` with these ``train`` settings (values of a validated config: not checked)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=values)})


def _differences(cfg: Config, recorded: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    ours, theirs = _flat(cfg.model_dump(mode="json")), _flat(recorded.model_dump(mode="json"))
    return [key for key in dict.fromkeys([*ours, *theirs]) if ours.get(key) != theirs.get(key)]


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def same_config(cfg: Config, run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` was made with ``cfg``: its config.yaml read as a config,
    so that a setting added since, at its default, is no difference (nor ``auto`` against a
    recorded precision); an unreadable one is."""
    config_file = run_dir / "config.yaml"
    recorded = _readable(config_file) if config_file.exists() else None
    return recorded is not None and _same(cfg, recorded)


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
