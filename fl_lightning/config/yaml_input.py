"""Reading a config's YAML strictly (YAML 1.2 scalars, bounded size) and `a.b=value` overrides."""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from fl_lightning.errors import ConfigError, show

# A config is a few hundred values; aliases can make a small file expand to billions.
MAX_VALUES = 100_000
# Digits of an integer: Python refuses to read more than 4300 (CVE-2020-10735).
MAX_DIGITS = 1000


def parse_yaml(text: str, what: str) -> Any:
    """Safely parse YAML `text`; a syntax error or a key written twice names `what` and the line.

    Plain scalars are read as YAML 1.2's core schema reads them (`1e-3` is a number, a
    date is text), and one that YAML 1.1, PyYAML's default, reads otherwise is refused in
    one line rather than guessed: `010` (octal 8 in 1.1), `0x2A`, `1:30` (90 in 1.1),
    `1_000`, `yes`/`no`/`on`/`off` (booleans in 1.1). Numbers are plain decimals.
    """
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
    except _Refused as err:
        raise ConfigError(f"{what}: {err}") from None


def dump_yaml(data: Any) -> str:
    """`data` as YAML that `parse_yaml` (and any YAML 1.1 reader) reads back the same."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


class _MalformedYaml(ConfigError):
    """Text that is not YAML at all (an override's value is then taken as plain text)."""


class _DuplicateKey(Exception):
    """A mapping key written twice in one YAML document (internal; becomes a ConfigError)."""

    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _Refused(Exception):
    """A document that would expand past MAX_VALUES, a number past MAX_DIGITS, or a value
    YAML readers disagree on (`_Ambiguous`)."""


class _Ambiguous(_Refused):
    """A plain scalar YAML 1.1 and YAML 1.2 read differently (`010`, `1:30`, `yes`)."""


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
# What PyYAML's YAML 1.1 resolution makes of a plain scalar, to refuse where it disagrees.
_YAML11 = yaml.resolver.Resolver()
_NOT_TEXT_IN_YAML11 = {
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
}


# YAML 1.2's core schema (yaml.org/spec/1.2.2, 10.3.2): the only plain scalars that are not
# text. `<<` keeps merge keys working.
_CORE_SCHEMA = [
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        list("-+.0123456789"),
    ),
    ("tag:yaml.org,2002:merge", r"<<", ["<"]),
]


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if len(text) > MAX_DIGITS:
        raise _Refused(f"a number of {len(text)} digits is too long to be a config value")
    if not _DECIMAL.fullmatch(text):
        value = int(text[2:], 8 if text[1] == "o" else 16) if text[1:2] in "ox" else int(text)
        yaml11 = yaml.safe_load(text)
        if yaml11 == value:  # hexadecimal: the same in both, and still no config's number
            raise _Ambiguous(f"{text!r}{_line(node)} is not a plain decimal; write {value}")
        raise _Ambiguous(
            f"{text!r}{_line(node)} is read as {yaml11!r} by YAML 1.1 and as {value!r} by "
            "YAML 1.2; write the number you mean as a plain decimal"
        )
    return int(text, 10)


def _construct_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    text = str(loader.construct_scalar(node))
    if node.style is None:  # plain, not quoted: YAML 1.1 may read it as something else
        yaml11 = _YAML11.resolve(yaml.ScalarNode, text, (True, False))
        if yaml11 in _NOT_TEXT_IN_YAML11:
            raise _Ambiguous(
                f"{text!r}{_line(node)} is read as {yaml.safe_load(text)!r} by YAML 1.1 and as "
                "text by YAML 1.2; quote it if you mean text, else write a plain decimal "
                "number, true or false"
            )
    return text


def _line(node: yaml.Node) -> str:
    """Where `node` is, for a file's message (an override is one line: nothing to add)."""
    line = node.start_mark.line + 1
    return (
        f" (line {line})" if line > 1 or "\n" in str(node.start_mark.buffer).rstrip("\0\n") else ""
    )


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    return math.nan if text == ".nan" else float(text)


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() == "true"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars, no duplicate keys and a bounded size.

    PyYAML keeps the last of duplicate keys, so a second `data:` section silently drops
    the first. The whole node tree is checked before construction, so the error names the
    dotted key (`data.root`), not just the innermost one; and a document whose aliases
    would expand it past MAX_VALUES values is refused before anything is built.
    """

    # Its own table, empty of YAML 1.1's resolvers (filled with _CORE_SCHEMA below).
    yaml_implicit_resolvers: dict = {}  # noqa: RUF012 (PyYAML's class-level table)

    def construct_document(self, node: yaml.Node) -> Any:
        """Check `node` for its size and duplicate keys, then construct it as SafeLoader does."""
        _check_expanded_size(node)
        _check_duplicate_keys(node, "", set())
        return super().construct_document(node)


for _tag, _pattern, _first in _CORE_SCHEMA:
    _StrictLoader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), _first)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_StrictLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_StrictLoader.add_constructor("tag:yaml.org,2002:str", _construct_text)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes text YAML 1.2 would read as something else (`0o17`)."""


for _tag, _pattern, _first in _CORE_SCHEMA:
    _Dumper.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), _first)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it past MAX_VALUES values, or into itself.

    Each node's expanded size is computed once (an alias is the same node object again),
    so this is linear in the document's text even for a "billion laughs" document.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the path from the root: an alias to one is a loop
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        key = id(node)
        if closing:
            open_nodes.discard(key)
            sizes[key] = min(MAX_VALUES + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _Refused("an alias refers to a section that contains it (a loop)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    if sizes[id(root)] > MAX_VALUES:
        raise _Refused(
            f"expands to more than {MAX_VALUES} values (YAML aliases repeat whole sections); "
            "a config is far smaller: write it without nested aliases"
        )


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
                name = f"{path}{key_text(key_node.value)}"
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
        raise ConfigError(f"override {show(item)} is not KEY=VALUE, e.g. federation.num_rounds=2")
    value: Any = None
    if text.strip():
        try:
            value = parse_yaml(text, f"override {show(key.strip())}")
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
                f"{key_text(dotted)}: is a value, not a section, so {key_text(key.strip())} "
                "cannot be set"
            )
        node = child
    node[parts[-1]] = value


def key_text(key: Any) -> str:
    """A config key as it can appear in a one-line message (odd keys quoted, cut short)."""
    text = str(key) if isinstance(key, str) else show(key)
    if isinstance(key, str) and not re.fullmatch(r"[\w.\-\[\]]{1,80}", key):
        text = show(key)
    return text
