"""YAML as configs need it: PyYAML's safe loader, but a key given twice or an absurdly deep
document is an error, not a silent choice or a RecursionError.

Pure parsing, no knowledge of the config's sections (pbt_rl/config.py turns these errors into
one-line ConfigErrors naming the file).
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_DEPTH = 100
"""Deepest nesting of mappings and lists accepted in YAML input. A config needs about five levels;
PyYAML composes nodes recursively, so a deeper document would otherwise end in a RecursionError
(around 450 levels) instead of a message."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (``key``; 1-based ``line`` and ``first_line``)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class NestingError(yaml.YAMLError):
    """The document nests mappings and lists deeper than :data:`MAX_YAML_DEPTH` (at 1-based ``line``)."""

    def __init__(self, line: int) -> None:
        super().__init__(f"nested more than {MAX_YAML_DEPTH} levels deep at line {line}")
        self.line = line


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (same YAML 1.1 types) that rejects a key repeated in one mapping
    and nesting deeper than :data:`MAX_YAML_DEPTH`.

    safe_load keeps the last of two equal keys, so a second ``agent:`` block would silently drop
    the first one. Keys brought in by a merge (``<<: *anchor``) may still be overridden.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        # node -> the key nodes written in it. flatten_mapping splices merged keys into
        # node.value in place, sometimes before the node itself is constructed.
        self._written_keys: dict[yaml.MappingNode, list[yaml.Node]] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise NestingError(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if node not in self._written_keys:
            self._written_keys[node] = [key for key, _ in node.value if key.tag != _MERGE_TAG]
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        mapping = super().construct_mapping(node, deep=deep)  # raises first for unhashable keys
        first_seen: dict[Any, yaml.Node] = {}
        for key_node in self._written_keys.get(node, ()):
            key = self.construct_object(key_node, deep=True)  # already built: cached
            if key in first_seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, first_seen[key].start_mark.line + 1)
            first_seen[key] = key_node
        return mapping
