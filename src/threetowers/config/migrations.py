"""Keys that moved, read in their new place with a warning that names it.

- ``model.third: {...}`` (the one-tower shorthand) is ``model.frozen: [{name: h, ...}]``;
  where a file gives both, the list wins, as it always did.
- ``loss.weights.fh_h`` / ``gh_h`` are each frozen tower's ``f_weight`` / ``g_weight``: in a
  file, for the towers that set none; as an override, for every tower (a later setting wins).
- A tower's ``weight`` (both of its terms) is its ``f_weight`` and ``g_weight``.

Files, presets and a run directory's recorded config.yaml go through :func:`migrate`; dotted
overrides through :class:`LegacyOverrides`, which applies ``model.third.KEY=...`` to the one
frozen tower (or the one named h) as ``model.frozen.N.KEY`` does.
"""

from __future__ import annotations

import warnings
from typing import Any

from threetowers.config.base import ConfigError
from threetowers.config.overrides import set_path

SHORTHAND_NAME = "h"  # the name model.third's tower always had
SIDES = {"fh_h": "f_weight", "gh_h": "g_weight"}


class ConfigMigrationWarning(FutureWarning):
    """A config names a key that moved; it is read as the key that replaced it."""


def warn_moved(origin: str, old: str, new: str, how: str = "") -> None:
    warnings.warn(
        f"{origin}: {old} is {new} now{how}; read as that. Write the new key: `threetowers "
        "config` prints the whole config in today's form",
        ConfigMigrationWarning,
        stacklevel=1,  # the message names the file or the override: once each
    )


def migrate(raw: dict[str, Any], origin: str) -> None:
    """``raw`` (a file's mapping) in today's form, in place. Malformed sections are left to
    validation, which names them."""
    model = raw.get("model")
    if isinstance(model, dict):
        _migrate_third(model, origin)
        for position, tower in enumerate(_list(model.get("frozen"))):
            _migrate_tower_weight(tower, f"model.frozen.{position}", origin)
    loss = raw.get("loss")
    weights = loss.get("weights") if isinstance(loss, dict) else None
    for old, new in SIDES.items():
        if isinstance(weights, dict) and old in weights:
            value = weights.pop(old)
            for tower in towers_of(raw, origin):
                tower.setdefault(new, value)
            how = " (each tower's weight of its term), for the towers that set none"
            warn_moved(origin, f"loss.weights.{old}", f"model.frozen.N.{new}", how)


def _migrate_third(model: dict[str, Any], origin: str) -> None:
    if "third" not in model:
        if "frozen" in model and model["frozen"] is None:
            del model["frozen"]  # null meant "no list": the default tower
        return
    third = model.pop("third")
    if model.get("frozen") is None:  # else the list replaced the shorthand, as it always did
        model["frozen"] = [] if third is None else [third]
    how = " (model.third was the one-tower shorthand of that list)"
    warn_moved(origin, "model.third", f"model.frozen: [{{name: {SHORTHAND_NAME}, ...}}]", how)


def _migrate_tower_weight(tower: Any, where: str, origin: str) -> None:
    if not isinstance(tower, dict) or "weight" not in tower:
        return
    weight = tower.pop("weight")
    if weight is not None:  # null meant "loss.weights' own"
        tower.setdefault("f_weight", weight)
        tower.setdefault("g_weight", weight)
        warn_moved(origin, f"{where}.weight", f"{where}.f_weight and {where}.g_weight")


def towers_of(raw: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    """The frozen towers' mappings in ``raw``; the default one made explicit when none is."""
    model = raw.setdefault("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"{origin}: model is a value, not a section")
    if model.get("frozen") is None:
        model["frozen"] = [{}]  # ModelConfig's default: one tower, named h
    if not isinstance(model["frozen"], list):
        raise ConfigError(f"{origin}: model.frozen is not a list of towers")
    return [tower for tower in model["frozen"] if isinstance(tower, dict)]


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


class LegacyOverrides:
    """Dotted overrides of moved keys, applied in their new place, in command-line order."""

    def __init__(self) -> None:
        # loss.weights.fh_h=x also weighs the towers that later overrides add
        self.sides: dict[str, Any] = {}

    def apply(self, raw: dict[str, Any], parts: list[str], value: Any, item: str) -> bool:
        """Whether ``parts`` named a moved key (then applied to ``raw``)."""
        origin = f"override {item!r}"
        key = ".".join(parts)
        if parts[:2] == ["model", "third"]:
            self._third(raw, parts[2:], value, item)
        elif parts[:2] == ["loss", "weights"] and len(parts) == 3 and parts[2] in SIDES:
            new = SIDES[parts[2]]
            self.sides[new] = value
            for tower in towers_of(raw, origin):
                tower[new] = value
            warn_moved(origin, key, f"model.frozen.N.{new}", " (set on every frozen tower)")
        elif parts[:2] == ["model", "frozen"] and len(parts) == 4 and parts[3] == "weight":
            for side in SIDES.values():
                set_path(raw, [*parts[:3], side], value, item)
            where = ".".join(parts[:3])
            warn_moved(origin, key, f"{where}.f_weight and {where}.g_weight")
        else:
            return False
        return True

    def fill(self, raw: dict[str, Any], origin: str) -> None:
        """Give the towers without their own weights those of earlier fh_h / gh_h overrides."""
        if self.sides:
            for tower in towers_of(raw, origin):
                for key, value in self.sides.items():
                    tower.setdefault(key, value)

    def _third(self, raw: dict[str, Any], rest: list[str], value: Any, item: str) -> None:
        origin = f"override {item!r}"
        towers_of(raw, origin)
        frozen = raw["model"]["frozen"]
        index = _shorthand_index(frozen)
        if not rest and value is None:  # no third tower
            if index is not None:
                del frozen[index]
            new = "model.frozen (the tower removed)"
        else:
            if index is None:
                frozen.append({})
                index = len(frozen) - 1
            where = f"model.frozen.{index}"
            if rest == ["weight"]:
                for side in SIDES.values():
                    set_path(raw, [*where.split("."), side], value, item)
                new = f"{where}.f_weight and g_weight"
            else:
                new = ".".join([where, *rest])
                set_path(raw, new.split("."), value, item)
                _migrate_tower_weight(frozen[index], where, origin)  # a whole tower given
        how = " (model.third was the one-tower shorthand of model.frozen)"
        warn_moved(origin, ".".join(["model", "third", *rest]), new, how)


def _shorthand_index(towers: list) -> int | None:
    """The tower model.third means: the only one, else the one named h."""
    if len(towers) == 1:
        return 0
    names = [
        tower.get("name", SHORTHAND_NAME) if isinstance(tower, dict) else None for tower in towers
    ]
    return names.index(SHORTHAND_NAME) if SHORTHAND_NAME in names else None
