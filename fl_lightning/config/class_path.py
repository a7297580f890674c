"""Classes named as Lightning's CLI names them: `class_path` plus `init_args`, checked at load.

A config names a user's LightningModule, LightningDataModule or Callback by its import
path; this module imports it (from the working directory and its packages too), checks
its kind, and checks `init_args` against the constructor's signature, so a typo fails
when the config is loaded, with the key's name, not in a client process later.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fl_lightning.errors import ConfigError, closest


@dataclass(frozen=True)
class ClassSpec:
    """A class by import path and the keyword arguments its constructor gets."""

    class_path: str
    # Left out of the hash (a dict has none), so configs holding a spec stay hashable.
    init_args: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """As written in a config: `{class_path: ..., init_args: {...}}`."""
        return {"class_path": self.class_path, "init_args": dict(self.init_args)}


@contextlib.contextmanager
def import_path(*folders: str) -> Iterator[None]:
    """`folders` importable inside (appended to sys.path where missing), sys.path as it
    was after: a library call leaves the process's import path alone."""
    added = [folder for folder in dict.fromkeys(folders) if folder not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for folder in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def import_class(class_path: str, key: str, base: type | None = None) -> type:
    """The class `class_path` names (a subclass of `base`), or a ConfigError naming `key`."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name or not name:
        raise ConfigError(
            f"{key}: {class_path!r} is not a class path; write it as package.module.ClassName"
        )
    # `fl-lightning run` is a console script, so the user's project (the working directory)
    # is not on sys.path the way it is for `python -m`; Lightning's CLI behaves the same.
    try:
        with import_path(os.getcwd()):
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{key}: cannot import {module_name!r} ({err}); run from your project's folder "
            "or install it, and check the spelling"
        ) from None
    except Exception as err:  # the user's module raised while importing
        raise ConfigError(
            f"{key}: importing {module_name!r} failed: {type(err).__name__}: {err}"
        ) from None
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        names = [n for n, v in vars(module).items() if inspect.isclass(v)]
        close = closest(name, names)
        hint = f" (did you mean {module_name}.{close}?)" if close else ""
        raise ConfigError(f"{key}: {module_name!r} has no class {name!r}{hint}")
    if base is not None and not issubclass(cls, base):
        raise ConfigError(f"{key}: {class_path} is not a {_kind(base)}{_legacy_hint(cls)}")
    return cls


def _kind(base: type) -> str:
    return f"{base.__module__.split('.')[0]}.{base.__name__}"


def _legacy_hint(cls: type) -> str:
    """What to change when `cls` was written against the separate `pytorch_lightning` package."""
    if any(k.__module__.startswith("pytorch_lightning") for k in cls.__mro__):
        return (
            "; it subclasses the separate `pytorch_lightning` package: import from "
            "`lightning.pytorch` instead (e.g. `import lightning.pytorch as pl`)"
        )
    return ""


def check_init_args(cls: type, init_args: dict[str, Any], key: str, given: set[str]) -> None:
    """Raise a ConfigError naming `key` if `cls(**init_args, **given)` cannot bind.

    `given` names the arguments fl-lightning itself passes (e.g. `partition_id`).
    """
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # a C extension without a signature: try at build time
        return
    clash = sorted(given & set(init_args))
    if clash:
        raise ConfigError(
            f"{key}.init_args: {', '.join(clash)} is set by fl-lightning for each client; "
            "remove it from init_args"
        )
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in init_args:
        if name not in params and not takes_any:
            close = closest(name, params)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(
                f"{key}.init_args.{name}: {cls.__name__}.__init__ takes no argument {name!r}{hint}"
            )
    placeholders = dict.fromkeys(given & set(params), None)
    try:
        signature.bind(**init_args, **placeholders)
    except TypeError as err:
        raise ConfigError(f"{key}.init_args: {cls.__name__}({err})") from None


def instantiate(spec: ClassSpec, key: str, base: type, **given: Any) -> Any:
    """`spec`'s class built with its init_args and `given`; a ConfigError if it refuses."""
    cls = import_class(spec.class_path, key, base)
    try:
        return cls(**spec.init_args, **given)
    except (TypeError, ValueError) as err:  # the constructor rejected an argument
        raise ConfigError(f"{key}.init_args: {cls.__name__} refused them: {err}") from None
