"""Classes named as Lightning's CLI names them: `class_path` plus `init_args`, checked at load.

A config names a user's LightningModule, LightningDataModule or Callback by its import
path; this module imports it (from the working directory and its packages too), checks
its kind, and checks `init_args` against the constructor's signature, so a typo fails
when the config is loaded, with the key's name, not in a client process later.

As in LightningCLI, a value in `init_args` (or in a list or mapping there) written as
`{class_path: ..., init_args: {...}}` is a class too: built and passed as an instance, or,
where the parameter is annotated `Callable[..., X]` and the class is an X (LightningCLI's
`OptimizerCallable`), passed as `functools.partial(cls, **init_args)` for the module to call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fl_lightning.errors import ConfigError, check, closest, show


@dataclass(frozen=True)
class ClassSpec:
    """A class by import path and the keyword arguments its constructor gets."""

    class_path: str
    # Left out of the hash (a dict has none), so configs holding a spec stay hashable.
    init_args: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """As written in a config: `{class_path: ..., init_args: {...}}`."""
        return {"class_path": self.class_path, "init_args": dict(self.init_args)}


# The keys of a class as a config gives it, at the top level or nested in init_args.
SPEC_KEYS = ("class_path", "init_args")
# What `_each_spec` does with a spec it finds: given the spec, its key and the annotation
# of the parameter it is passed to, what stands in its place.
Visit = Callable[[ClassSpec, str, Any], Any]


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


def check_init_args(
    cls: type, init_args: dict[str, Any], key: str, given: set[str], partial: bool = False
) -> None:
    """Raise a ConfigError naming `key` if `cls(**init_args, **given)` cannot bind.

    `given` names the arguments fl-lightning itself passes (e.g. `partition_id`); with
    `partial`, the class is called later with the rest (a `functools.partial` of it).
    Class specs nested in `init_args` are checked the same way, by their full key.
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
    bind = signature.bind_partial if partial else signature.bind
    try:
        bind(**init_args, **placeholders)
    except TypeError as err:
        raise ConfigError(f"{key}.init_args: {cls.__name__}({err})") from None
    hints = _init_hints(cls)
    for name, value in init_args.items():
        _each_spec(value, f"{key}.init_args.{name}", hints.get(name), _check_nested)


def instantiate(spec: ClassSpec, key: str, base: type, **given: Any) -> Any:
    """`spec`'s class built with its init_args (nested specs built too) and `given`; a
    ConfigError if it refuses."""
    cls = import_class(spec.class_path, key, base)
    return _construct(cls, {**_built_args(cls, spec.init_args, key), **given}, key)


def nested_spec(value: Any, key: str) -> ClassSpec | None:
    """`value` as a ClassSpec if it is written as one, else None: a mapping of `class_path`
    and, optionally, `init_args` (with other keys too, it is data, passed on as a dict)."""
    if not isinstance(value, dict) or "class_path" not in value:
        return None
    extra = [str(name) for name in value if name not in SPEC_KEYS]
    # `init_arg` beside a class_path is a typo, not data: passed on as a dict, it would
    # fail in the clients, at round 0, as "'dict' object is not callable".
    typo = next((name for name in extra if closest(name, SPEC_KEYS)), None)
    if typo is not None:
        raise ConfigError(
            f"{key}.{typo}: did you mean {closest(typo, SPEC_KEYS)!r}? A class is given by "
            "class_path and init_args"
        )
    if extra:
        return None
    class_path, init_args = value["class_path"], value.get("init_args") or {}
    check(
        isinstance(class_path, str),
        f"{key}.class_path",
        f"{show(class_path)} is not a class path; write it as package.module.ClassName",
    )
    check(
        isinstance(init_args, dict) and all(isinstance(name, str) for name in init_args),
        f"{key}.init_args",
        f"{show(init_args)} is not a mapping of argument names to values",
    )
    return ClassSpec(class_path, dict(init_args))


def _each_spec(value: Any, key: str, hint: Any, visit: Visit) -> Any:
    """`value` with each class spec in it (also inside lists and mappings) replaced by
    `visit(spec, key, hint)`; `hint` is the annotation of the parameter it is passed to."""
    if isinstance(value, list):
        return [_each_spec(item, f"{key}[{i}]", hint, visit) for i, item in enumerate(value)]
    spec = nested_spec(value, key)
    if spec is not None:
        return visit(spec, key, hint)
    if isinstance(value, dict):
        return {
            name: _each_spec(item, f"{key}.{name}", hint, visit) for name, item in value.items()
        }
    return value


def _check_nested(spec: ClassSpec, key: str, hint: Any) -> ClassSpec:
    """Check a nested spec's class and init_args at load, without building it."""
    cls = import_class(spec.class_path, f"{key}.class_path")
    check_init_args(cls, spec.init_args, key, given=set(), partial=_wants_factory(hint, cls))
    return spec


def _build_nested(spec: ClassSpec, key: str, hint: Any) -> Any:
    """A nested spec built: an instance, or, where a callable is wanted, a partial of it."""
    cls = import_class(spec.class_path, f"{key}.class_path")
    kwargs = _built_args(cls, spec.init_args, key)
    if _wants_factory(hint, cls):
        # LightningCLI's OptimizerCallable: the module calls it with what only it has
        # (its parameters), so the class is bound to its init_args, not called here.
        return functools.partial(cls, **kwargs)
    return _construct(cls, kwargs, key)


def _built_args(cls: type, init_args: dict[str, Any], key: str) -> dict[str, Any]:
    hints = _init_hints(cls)
    return {
        name: _each_spec(value, f"{key}.init_args.{name}", hints.get(name), _build_nested)
        for name, value in init_args.items()
    }


def _construct(cls: type, kwargs: dict[str, Any], key: str) -> Any:
    """`cls(**kwargs)`, or a ConfigError naming `key` if the constructor refuses them."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return cls(**kwargs)
    # How constructors refuse an argument: Python's binding and checks (TypeError,
    # ValueError), Lightning's own (EarlyStopping's `mode`). A user's class failing
    # otherwise is a bug in it, left to its traceback.
    except (TypeError, ValueError, MisconfigurationException) as err:
        raise ConfigError(f"{key}.init_args: {cls.__name__} refused them: {err}") from None


def _init_hints(cls: type) -> dict[str, Any]:
    """The constructor's parameter annotations, resolved; {} where they cannot be."""
    try:
        params = inspect.signature(cls, eval_str=True).parameters
    except Exception:  # no signature, a name only imported under TYPE_CHECKING, a typo
        return {}
    return {name: param.annotation for name, param in params.items()}


def _wants_factory(hint: Any, cls: type) -> bool:
    """Whether `hint` asks for a callable that returns a `cls` (`Callable[..., X]` with `cls`
    an X, as LightningCLI's OptimizerCallable), also as a union's option or a list's items.

    A callable returning something else (`Callable[[Tensor], Tensor]` for an activation)
    takes an instance, as LightningCLI gives it.
    """
    if typing.get_origin(hint) is Callable:
        returns = typing.get_args(hint)[-1:]  # (), bare Callable: no return type to match
        options = [o for r in returns for o in (typing.get_args(r) if _is_union(r) else (r,))]
        return any(isinstance(o, type) and issubclass(cls, o) for o in options)
    return any(_wants_factory(arg, cls) for arg in typing.get_args(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
