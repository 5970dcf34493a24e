"""YAML a user wrote, parsed with guards: duplicate keys, deep nesting and alias bombs are
refused while parsing, before any work, each with the line it is on."""

from __future__ import annotations

import reprlib
from typing import Any, NoReturn

import yaml

from threetowers.config.base import ConfigError

# Far beyond any real config (a few levels deep, a few hundred values), yet small enough that
# a hostile one is refused while parsing instead of exhausting the stack or memory later.
MAX_DEPTH = 64
MAX_VALUES = 100_000
_TOO_DEEP = (
    f"nested more than {MAX_DEPTH} levels deep, aliases expanded (a config is a few levels "
    "deep); flatten it"
)
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Error messages show at most this much of a wrong value.
SHORT = reprlib.Repr()
SHORT.maxstring = SHORT.maxother = 120


class _GuardedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys, deep nesting and alias bombs.

    Aliases share one parsed node but expand when the config is validated or printed, so the
    limits apply to the expanded document; ``measured`` holds each node's expanded size.
    """

    def __init__(self, text: str, origin: str) -> None:
        super().__init__(text)
        self.origin = origin
        self.depth = 0
        self.measured: dict[yaml.Node, tuple[int, int]] = {}  # node -> (values, levels)

    def refuse(self, mark: yaml.Mark, problem: str) -> NoReturn:
        raise ConfigError(f"{self.origin}, line {mark.line + 1}: {problem}")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node not in self.measured:  # its anchor is still open: the value contains itself
                self.refuse(event.start_mark, f"alias *{event.anchor} is inside its own value")
            if self.depth + self.measured[node][1] > MAX_DEPTH:
                self.refuse(event.start_mark, _TOO_DEEP)
            return node
        # PyYAML composes recursively: stop long before Python's recursion limit
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.refuse(event.start_mark, _TOO_DEEP)
        node = super().compose_node(parent, index)
        self.depth -= 1
        children = []
        if isinstance(node, yaml.MappingNode):
            self.check_keys(node)
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        values = 1 + sum(self.measured[child][0] for child in children)
        if values > MAX_VALUES:
            self.refuse(
                event.start_mark,
                f"this value holds over {MAX_VALUES:,} values once its aliases (*name) are "
                "expanded; a config needs far fewer: write the values out, or nest fewer aliases",
            )
        levels = 1 + max((self.measured[child][1] for child in children), default=0)
        self.measured[node] = values, levels
        return node

    def check_keys(self, node: yaml.MappingNode) -> None:
        """A key given twice in one mapping: YAML would keep the last one silently."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            # merge keys (<<) may repeat, and the keys they merge in are meant to be overridden
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in lines:
                self.refuse(
                    key_node.start_mark,
                    f"key {SHORT.repr(key)} is given twice (first on line {lines[key]}); "
                    "keep one: the last would silently replace the first",
                )
            lines[key] = key_node.start_mark.line + 1


def parse_yaml(text: str, origin: str) -> Any:
    """One YAML document a user wrote, through the guards; ``origin`` names it in errors."""
    loader = _GuardedLoader(text, origin)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
