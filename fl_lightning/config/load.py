"""Loading a config: YAML file, `a.b=value` overrides, sections, paths; validated once."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from fl_lightning.config.class_path import import_path
from fl_lightning.config.coerce import build_section
from fl_lightning.config.schema import (
    BUILTIN_DATA_KEYS,
    BUILTIN_MODEL_KEYS,
    BUILTIN_OPTIMIZER_KEYS,
    Config,
    DataConfig,
)
from fl_lightning.config.validate import check_path_length, validate
from fl_lightning.config.yaml_input import apply_override, parse_yaml
from fl_lightning.errors import ConfigError, check, show


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file, apply `a.b=value` overrides, and return the validated Config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass the path of a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: pass a YAML file") from None
    except (OSError, ValueError) as err:  # a folder, no permission, a NUL in the path
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(
            f"config file {path} cannot be read ({reason}): pass a YAML file"
        ) from None
    raw = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {show(raw)}")
    for item in overrides:
        apply_override(raw, item)
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict) and raw["output"].get("experiment") is None:
        raw["output"]["experiment"] = path.stem
    # A project keeps its config beside its package (`fl-lightning init`): the classes it
    # names import from the config's folder too, wherever the command is started (the CLI
    # puts that folder on its processes' import path for the run itself).
    with import_path(str(path.resolve().parent)):
        return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (unknown keys are errors)."""
    raw = _check_class_path_sections(raw)
    cfg = build_section(Config, raw, prefix="")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            root=_resolve_path(cfg.data.root, "data.root"),
            cache_dir=_resolve_path(cfg.data.cache_dir, "data.cache_dir"),
        ),
    )
    validate(cfg)
    return cfg


def data_config(raw: dict[str, Any], prefix: str) -> DataConfig:
    """A `data` section on its own (e.g. a DataModule's init_args): typed, paths resolved."""
    data = build_section(DataConfig, raw, prefix)
    return dataclasses.replace(
        data,
        root=_resolve_path(data.root, f"{prefix}root"),
        cache_dir=_resolve_path(data.cache_dir, f"{prefix}cache_dir"),
    )


def _resolve_path(text: str, key: str) -> str:
    """`text` as an absolute path (`~` expanded), or a ConfigError naming `key`."""
    check_path_length(text, key)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # `~name` of a user this machine does not know
        user = text.split("/", 1)[0]
        raise ConfigError(
            f"{key}: cannot expand {show(text)}: there is no user {show(user[1:])} here; "
            "write the path out in full"
        ) from None
    try:
        return str(path.resolve())
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, an odd file system
        raise ConfigError(f"{key}: {show(text)} is not a usable path ({err})") from None


def _check_class_path_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """A class_path module or DataModule brings its own settings: the built-in ones are errors.

    Checked on the raw sections, so a key written with its default value is refused too
    (it would silently do nothing). Returns `raw` with `model.name` null under a class path.
    """
    model, data, optimizer = (raw.get(name) for name in ("model", "data", "optimizer"))
    if isinstance(model, dict) and model.get("class_path") is not None:
        check(
            model.get("name") is None,
            "model.name",
            "set either model.name (a built-in model) or model.class_path, not both",
        )
        raw = {**raw, "model": {**model, "name": None}}  # a copy: the caller's stays as given
        _check_absent(model, BUILTIN_MODEL_KEYS, "model", "model.init_args")
        if isinstance(optimizer, dict):
            _check_absent(
                optimizer, BUILTIN_OPTIMIZER_KEYS, "optimizer", "your module's configure_optimizers"
            )
    if isinstance(data, dict) and data.get("class_path") is not None:
        _check_absent(data, BUILTIN_DATA_KEYS, "data", "data.init_args")
    return raw


def _check_absent(section: dict[str, Any], keys: tuple[str, ...], name: str, where: str) -> None:
    given = [key for key in keys if key in section]
    check(
        not given,
        f"{name}.{given[0] if given else ''}",
        f"configures the built-in {name} only, and {name.split('.')[0]}.class_path names "
        f"your own; set it in {where} instead",
    )
