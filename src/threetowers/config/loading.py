"""Loading a config: a YAML file or a preset, then dotted ``key=value`` overrides, then
validation. Every failure becomes one ``ConfigError`` that names each bad key, what is wrong
and how to fix it; keys that moved are read in their new place (migrations.py)."""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from threetowers.config.base import ConfigError
from threetowers.config.experiment import EXPERIMENT_SECTIONS, ExperimentConfig
from threetowers.config.migrations import LegacyOverrides, migrate
from threetowers.config.overrides import parse_override, set_path
from threetowers.config.root import Config
from threetowers.config.yaml_guard import SHORT, parse_yaml

PRESETS_DIR = Path(__file__).parent.parent / "presets"
Root = TypeVar("Root", bound=Config)


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A YAML file, a preset name (``tiny``, ``b16``, ...) or None (defaults), then overrides.
    The experiment grid's sections (``pretrain``, ``reproduce``) are dropped: a training run
    does not read them (``load_experiment_config`` does)."""
    raw, origin = _raw_config(source, overrides)
    sections = {name: raw.pop(name) for name in EXPERIMENT_SECTIONS if name in raw}
    if any(not _at_defaults(name, section) for name, section in sections.items()):
        # One message whatever the file, so that Python shows it once per process. A run
        # directory's config.yaml of before holds both sections at their defaults: no news.
        warnings.warn(
            "the pretrain and reproduce sections are read by `threetowers pretrain` and "
            "`threetowers reproduce` only; other commands ignore them",
            UserWarning,
            stacklevel=1,
        )
    return _validated(Config, raw, origin)


def _at_defaults(name: str, section: Any) -> bool:
    default = ExperimentConfig.model_fields[name].default
    try:
        return type(default).model_validate(section) == default
    except ValidationError:
        return False


def load_experiment_config(
    source: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """``load_config``'s config with the experiment grid's sections, for ``threetowers
    pretrain`` and ``threetowers reproduce``."""
    raw, origin = _raw_config(source, overrides)
    return _validated(ExperimentConfig, raw, origin)


def _raw_config(
    source: str | Path | None, overrides: list[str] | None
) -> tuple[dict[str, Any], str]:
    origin = str(source) if source is not None else "defaults"
    raw = read_mapping(source) if source is not None else {}
    migrate(raw, origin)
    legacy = LegacyOverrides()
    for item in overrides or []:
        parts, value = parse_override(item)
        if not legacy.apply(raw, parts, value, item):
            set_path(raw, parts, value, item)
            migrate(raw, f"override {item!r}")  # a whole section given in an earlier form
        legacy.fill(raw, f"override {item!r}")
    return raw, origin


def _validated(root: type[Root], raw: dict[str, Any], origin: str) -> Root:
    try:
        return root.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, origin, root)) from None


def refuse_repeated_keys(overrides: list[str]) -> None:
    """A key given twice on the command line: the shell expanded an unquoted brace pattern
    (``data.train=/data/{000000..000331}.tar`` becomes 332 arguments, the last one winning),
    or a mistake; either way the run would not train on what the user named."""
    seen: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            seen.setdefault(key.strip(), []).append(value)
    for key, values in seen.items():
        if len(values) > 1:
            shown = ", ".join(f"{key}={value}" for value in values[:2])
            raise ConfigError(
                f"{key} is given {len(values)} times on the command line ({shown}"
                f"{', ...' if len(values) > 2 else ''}); give it once. An unquoted brace "
                "pattern is expanded by the shell into one argument per file: quote it, e.g. "
                f"'{key}=/data/cc3m/{{000000..000331}}.tar'"
            )


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def read_mapping(source: str | Path) -> dict[str, Any]:
    """A YAML file or a preset as its raw mapping, through the guards, not validated."""
    path = Path(source)
    if not path.exists() and (PRESETS_DIR / f"{source}.yaml").exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {str(source)!r} is neither a file nor a preset; presets: {preset_names()}"
        )
    try:
        raw = parse_yaml(path.read_text(), str(path))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def _describe(error: ValidationError, origin: str, root: type[BaseModel]) -> str:
    lines = [f"invalid config ({origin}):"]
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_suggestion(problem['loc'], root)}")
        elif problem["type"] in ("value_error", "assertion_error"):
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message}")
        else:
            lines.append(f"  {where}: {problem['msg']} (got {SHORT.repr(problem.get('input'))})")
    return "\n".join(lines)


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds: itself, or inside ``X | None``, ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [s for arg in getattr(annotation, "__args__", ()) for s in _sections_in(arg)]


def _suggestion(loc: tuple, root: type[BaseModel]) -> str:
    """Name the valid keys of the section holding an unknown key, closest first."""
    section = root
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (model.frozen.0)
            continue
        annotation = section.model_fields[part].annotation if part in section.model_fields else None
        candidates = _sections_in(annotation)
        if not candidates:
            return ""
        section = candidates[0]
    valid = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} valid keys: {', '.join(valid)}"
