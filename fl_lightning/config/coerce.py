"""Building the typed config from nested dicts: every key checked, every value coerced.

Values are converted only where that is lossless (an int where a float belongs); anything
else is a ConfigError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal

from fl_lightning.config.schema import TrainerConfig
from fl_lightning.config.yaml_input import key_text
from fl_lightning.errors import ConfigError, check, closest, show


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from `raw`, checking every key and value type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: must be a section (mapping of keys), "
            f"not {show(raw)}"
        )
    hints = typing.get_type_hints(cls, include_extras=True)  # NodeId is Annotated
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    if cls is TrainerConfig:
        # Every other Trainer keyword is accepted, checked against Trainer's signature.
        from fl_lightning.config.trainer_flags import trainer_extras

        raw = dict(raw)
        kwargs["extra"] = trainer_extras(
            {k: raw.pop(k) for k in list(raw) if k not in names or k == "extra"}
        )
    for key, value in raw.items():
        if key not in names:
            close = closest(key, names)
            hint = f" (did you mean '{prefix}{close}'?)" if close else ""
            raise ConfigError(
                f"{prefix}{key_text(key)}: unknown config key{hint}; known: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        check(not required or f.name in kwargs, f"{prefix}{f.name}", "is required here")
    return cls(**kwargs)


def trainer_value(name: str, value: Any) -> Any:
    """`value` for `trainer.<name>`, checked and converted as a config file's would be."""
    hint = typing.get_type_hints(TrainerConfig)[name]
    return _coerce(value, hint, f"trainer.{name}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against type `hint`, converting only where it is lossless (int -> float)."""
    if dataclasses.is_dataclass(hint):
        return build_section(typing.cast(type, hint), value, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    if origin is Annotated:  # NodeId: an integer in uint64's range
        if not _is_uint64(value):
            raise ConfigError(f"{key}: {show(value)} is not a node id (an integer in [0, 2**64))")
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        # Same type too: `True == 1` and `1.0 == 1` in Python, but not in a config.
        if not any(type(value) is type(a) and value == a for a in allowed):
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{key}: {show(value)} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), key)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: {show(value)} is not a mapping of names to values")
        return dict(value)
    if origin in (tuple, list):
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: {show(value)} is not a list")
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint in (bool, int, float, str):
        return _coerce_scalar(value, hint, key)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _is_uint64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _coerce_union(value: Any, options: tuple[Any, ...], key: str) -> Any:
    if value is None and type(None) in options:
        return None
    real = [o for o in options if o is not type(None)]
    if len(real) == 1:  # `float | None`: the float's own message says more
        if value is None:
            raise ConfigError(f"{key}: null is not allowed here; give a {_type_name(real[0])}")
        return _coerce(value, real[0], key)
    for option in real:
        try:
            return _coerce(value, option, key)
        except ConfigError:
            continue
    names = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key}: {show(value)} is not {names}")


# Every integer ends up in torch or NumPy (seeds, sizes, counts), whose integers are int64.
_INT64_MAX = 2**63 - 1


def _coerce_scalar(value: Any, hint: type, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {show(value)} is not true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {show(value)} is not an integer")
        if abs(value) > _INT64_MAX:
            raise ConfigError(f"{key}: {show(value)} is too large (at most 2**63 - 1)")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _parse_float(value, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: {show(value)} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {show(value)}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {show(value)} is not a string")
    if "\0" in value:  # no path, name or address holds one; pathlib and torch raise on it
        raise ConfigError(f"{key}: {show(value)} contains a NUL character")
    return value


def _parse_float(text: str, key: str) -> float:
    # YAML 1.1 reads `1e-3` (no dot) as a string; users mean the number.
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: {show(text)} is not a number") from None


def _type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
