"""The YAML reading every lorakit config file goes through: PyYAML's SafeLoader (plain data, never objects), with
each key's line recorded and duplicate keys caught, which YAML forbids and PyYAML would silently resolve."""

from __future__ import annotations

from typing import Any

import yaml

Problem = tuple[str | None, str]  # (the dotted key it is about, for its location; the message)


class ConfigLoader(yaml.SafeLoader):
    """A SafeLoader that records each mapping key's line and every duplicate key: YAML requires unique keys, and
    PyYAML would silently keep the last value."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_lines: dict[str, int] = {}
        self.duplicates: list[tuple[str, int, int]] = []  # (dotted key, first line, repeated line)

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_keys(node, "", set())
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias met again (aliases may even make a cycle)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{path}[{i}]", seen)
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<: *defaults` may be overridden by later keys; complex keys fail in construction
            name = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = key_node.start_mark.line + 1
            identity = (key_node.tag, key_node.value)
            if identity in first:
                self.duplicates.append((name, first[identity], line))
            first.setdefault(identity, line)
            self.key_lines[name] = line
            self._check_keys(value_node, name, seen)
