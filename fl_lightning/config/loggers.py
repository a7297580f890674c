"""`output.loggers`: the Lightning loggers a config names, checked and built for the server.

Any `lightning.pytorch.loggers.Logger` by class_path and init_args (CSVLogger, MLFlowLogger,
WandbLogger, your own). The server gives each the round metrics and the config, as it gives
TensorBoard; a logger whose package is missing is one line naming it when `fl-lightning`
starts the run (`check_loggers`). Clients load the same config and never build them, so a
site needs no tracker's package.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

from fl_lightning.config.class_path import ClassSpec, check_init_args, import_class, instantiate
from fl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger


def check_loggers(specs: tuple[ClassSpec, ...]) -> None:
    """Import, check and build each logger once (into a throwaway folder), naming its key."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fl-lightning-loggers-") as folder:
        for index, spec in enumerate(specs):
            _build(spec, f"output.loggers[{index}]", Path(folder), check=True)


def build_loggers(specs: tuple[ClassSpec, ...], run_dir: Path) -> list[Logger]:
    """The config's loggers, each writing into `run_dir` unless its init_args say where."""
    return [_build(spec, f"output.loggers[{i}]", run_dir) for i, spec in enumerate(specs)]


def _build(spec: ClassSpec, key: str, save_dir: Path, check: bool = False) -> Logger:
    from lightning.pytorch.loggers import Logger

    cls = import_class(spec.class_path, f"{key}.class_path", Logger)
    takes_dir = "save_dir" in inspect.signature(cls).parameters
    given = {"save_dir": str(save_dir)} if takes_dir and "save_dir" not in spec.init_args else {}
    if check:
        check_init_args(cls, spec.init_args, key, given=set(given))
    try:
        return instantiate(spec, key, Logger, **given)
    except ImportError as err:  # Lightning's MLFlowLogger, WandbLogger, ... without their package
        raise ConfigError(
            f"{key}.class_path: {cls.__name__} needs a package that is not installed ({err}); "
            "install it or remove the logger"
        ) from None
