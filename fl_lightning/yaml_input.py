"""Reading a config's YAML strictly and applying `a.b=value` overrides to it."""

from __future__ import annotations

import re
import reprlib
from typing import Any

import yaml

from fl_lightning.errors import ConfigError


def parse_yaml(text: str, what: str) -> Any:
    """Safely parse YAML `text`; a syntax error or a key written twice names `what` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise _MalformedYaml(f"{what} is malformed{where}: {problem}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively.
        raise ConfigError(f"{what} is nested too deeply to be a config") from None
    except _DuplicateKey as err:
        raise ConfigError(
            f"{what}: {err.key} is written twice (lines {err.first} and {err.second}); "
            "keep one (a second section or key would silently replace the first)"
        ) from None


class _MalformedYaml(ConfigError):
    """Text that is not YAML at all (an override's value is then taken as plain text)."""


class _DuplicateKey(Exception):
    """A mapping key written twice in one YAML document (internal; becomes a ConfigError)."""

    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in a mapping is an error.

    PyYAML keeps the last of duplicate keys, so a second `data:` section silently drops
    the first. The whole node tree is checked before construction, so the error names the
    dotted key (`data.root`), not just the innermost one.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        """Check `node` for duplicate keys, then construct it as SafeLoader does."""
        _check_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _check_duplicate_keys(node: yaml.Node, prefix: str, seen_nodes: set[int]) -> None:
    # An alias is the same node object again: visiting each node once keeps this linear
    # even for a "billion laughs" document (and finite for a recursive one).
    stack = [(node, prefix)]
    while stack:
        current, path = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            stack.extend((child, path) for child in current.value)
        if not isinstance(current, yaml.MappingNode):
            continue
        lines: dict[Any, int] = {}
        for key_node, value_node in current.value:
            # `<<: *base` merges are not in `current.value` yet (PyYAML flattens them when
            # it constructs the mapping), so overriding a merged key is not a duplicate.
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                name = f"{path}{_key_text(key_node.value)}"
                if key in lines:
                    raise _DuplicateKey(name, lines[key], line)
                lines[key] = line
                stack.append((value_node, f"{name}."))
            else:
                stack.append((value_node, path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (2, 1e-3, true, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {_show(item)} is not KEY=VALUE, e.g. federation.num_rounds=2")
    value: Any = None
    if text.strip():
        try:
            value = parse_yaml(text, f"override {_show(key.strip())}")
        except _MalformedYaml:
            value = text  # not YAML: the text itself (a string key checks it)
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # missing, or written empty (`data:` loads as None): a new section
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"{_key_text(dotted)}: is a value, not a section, so {_key_text(key.strip())} "
                "cannot be set"
            )
        node = child
    node[parts[-1]] = value


# Values quoted in one-line messages: short, one line, and cheap even for a huge value.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 6
_SHORT.maxlevel = 3


def _show(value: Any) -> str:
    """`value` as a short one-line repr for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        # repr of a huge int is slow (and long); Python refuses it past 4300 digits.
        return f"an integer of about 2**{value.bit_length()}"
    return _SHORT.repr(value)


def _key_text(key: Any) -> str:
    """A config key as it can appear in a one-line message (odd keys quoted, cut short)."""
    text = str(key) if isinstance(key, str) else _show(key)
    if isinstance(key, str) and not re.fullmatch(r"[\w.\-\[\]]{1,80}", key):
        text = _show(key)
    return text
