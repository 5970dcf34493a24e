"""Dotted ``key=value`` overrides, set into a config's raw mapping before validation.

A part that is a number indexes a list (``model.frozen.0.backbone=...``); the index one past
the end adds an item.
"""

from __future__ import annotations

from typing import Any

import yaml

from threetowers.config.base import ConfigError
from threetowers.config.yaml_guard import parse_yaml


def parse_override(item: str) -> tuple[list[str], Any]:
    """``key=value`` as (the key's parts, the value read as YAML, or as text if it is not)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.mode=clip)")
    try:
        value = parse_yaml(text, f"override {key.strip()}")
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def set_path(raw: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    """``raw[parts[0]][parts[1]]... = value``, making the sections on the way."""
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        child = _child(node, part, item, where)
        if child is None:
            child = [] if parts[depth + 1].isdigit() else {}
            _put(node, part, child, item, where)
        if not isinstance(child, dict | list):
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = child
    _put(node, parts[-1], value, item, ".".join(parts))


def _child(node: dict | list, part: str, item: str, where: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    index = _index(node, part, item, where)
    return node[index] if index < len(node) else None


def _put(node: dict | list, part: str, value: Any, item: str, where: str) -> None:
    if isinstance(node, dict):
        node[part] = value
        return
    index = _index(node, part, item, where)
    if index == len(node):
        node.append(value)
    else:
        node[index] = value


def _index(items: list, part: str, item: str, where: str) -> int:
    if not part.isdigit() or int(part) > len(items):
        raise ConfigError(
            f"override {item!r}: {where.rpartition('.')[0]} is a list of {len(items)}; give a "
            f"position from 0 to {len(items)} ({len(items)} adds an item)"
        )
    return int(part)
