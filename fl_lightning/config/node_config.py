"""The config as a Flower run config names it and as one SuperNode's node config runs it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

from fl_lightning.config.coerce import trainer_value
from fl_lightning.config.load import load_config
from fl_lightning.config.privacy_rules import check_client_devices
from fl_lightning.config.schema import Config
from fl_lightning.config.validate import check_path_length
from fl_lightning.errors import ConfigError, show
from fl_lightning.vocabulary import NUM_PARTITIONS, PARTITION_ID


def node_run_config(
    cfg: Config | None, run_config: typing.Mapping[str, Any], node_config: typing.Mapping[str, Any]
) -> Config:
    """The run's config (`cfg`, or the one `run_config` names) as this node runs it."""
    return apply_node_config(cfg or config_from_run_config(run_config), node_config)


def config_from_run_config(run_config: typing.Mapping[str, Any]) -> Config:
    """The Config named by a Flower run config's `config-path` and `overrides` (`flwr run .`)."""
    if "config-path" not in run_config:
        raise ConfigError(
            "run config key 'config-path' is missing: set it in [tool.flwr.app.config]"
        )
    return _load_named_config(str(run_config["config-path"]), str(run_config.get("overrides", "")))


@functools.lru_cache(maxsize=4)
def _load_named_config(path: str, overrides: str) -> Config:
    try:
        items = shlex.split(overrides)
    except ValueError as err:  # an unclosed quote
        raise ConfigError(f"run config 'overrides': {err}; quote each KEY=VALUE once") from None
    return load_config(_find_config(path), items)


# The checkout this package runs from (fl_lightning/config/node_config.py -> its root).
CHECKOUT = Path(__file__).resolve().parents[2]


def _find_config(path: str) -> Path:
    """`path`; a relative one from the Flower app, the working directory, or this checkout."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    # The app's own copy comes first: the working directory is that of the SuperLink that
    # started the run, which may be another project's folder with its own config.yaml.
    folders = [*_flower_app_dirs(), Path.cwd(), CHECKOUT]
    for folder in folders:
        if (folder / candidate).is_file():
            return folder / candidate
    return candidate  # found nowhere: load_config names it


def _flower_app_dirs() -> list[Path]:
    """The folders Flower unpacked apps into (FLWR_HOME/apps/...) on sys.path, in order.

    Flower's `load_app` puts the app's folder on sys.path before it imports the ServerApp
    or ClientApp (in the simulation process, its Ray workers, and Deployment Engine app
    processes alike); the user's classes import from there too.
    """
    from flwr.common.constant import APP_DIR
    from flwr.supercore.utils import get_flwr_home

    apps = (get_flwr_home() / APP_DIR).resolve()
    return [Path(entry) for entry in sys.path if entry and Path(entry).resolve().parent == apps]


def parse_devices(text: str) -> list[int]:
    """CUDA device indices from "0" or "0,1"; ValueError says what is wrong."""
    try:
        devices = [int(g) for g in text.split(",")]
    except ValueError:
        raise ValueError(f"expected CUDA device indices like 0 or 0,1; got {text!r}") from None
    if any(d < 0 for d in devices):
        raise ValueError(f"CUDA device indices are >= 0; got {text!r}")
    return devices


def apply_node_config(cfg: Config, node_config: typing.Mapping[str, Any]) -> Config:
    """`cfg` as one SuperNode runs it: its partition checked, its own settings applied.

    `partition-id` and `num-partitions` come from the Simulation Engine or from
    `flower-supernode --node-config`. Where a SuperNode's node config names them,
    `data-root` is the site's own data folder (see `_with_site_data`) and `gpus` (e.g.
    "0,1") puts the node's Trainer on those CUDA devices.
    """
    for key in (PARTITION_ID, NUM_PARTITIONS):
        if key not in node_config:
            raise ConfigError(
                f"node-config '{key}' is missing: start the SuperNode with "
                f"--node-config 'partition-id=K num-partitions=N'"
            )
    partition, partitions = (
        _node_int(node_config, PARTITION_ID),
        _node_int(node_config, NUM_PARTITIONS),
    )
    if partitions != cfg.federation.num_clients:
        raise ConfigError(
            f"node-config 'num-partitions' is {partitions} but federation.num_clients is "
            f"{cfg.federation.num_clients}; start one SuperNode per client with matching values "
            f'(flwr run: --federation-config "num-supernodes={cfg.federation.num_clients}")'
        )
    if not 0 <= partition < partitions:
        raise ConfigError(
            f"node-config 'partition-id' is {partition}; it must be in 0..{partitions - 1}"
        )
    return _with_site_hardware(_with_site_data(cfg, node_config), node_config)


# Trainer flags a SuperNode's node config may set for its own site's hardware.
HARDWARE_KEYS = ("accelerator", "devices", "precision", "strategy")


def _with_site_hardware(cfg: Config, node_config: typing.Mapping[str, Any]) -> Config:
    """`cfg` training on this SuperNode's hardware: `gpus`, or the Trainer's hardware flags.

    `gpus="0,1"` is short for `accelerator="gpu" devices=[0, 1]`; `accelerator`,
    `devices`, `precision` and `strategy` override the trainer section's, so one
    federation mixes a 2-GPU site and a CPU-only one. The result is checked as the
    config's own trainer section is.
    """
    from fl_lightning.config.trainer_flags import validate_trainer

    changes: dict[str, Any] = {k: node_config[k] for k in HARDWARE_KEYS if k in node_config}
    gpus = str(node_config.get("gpus", "")).strip()
    if gpus:
        both = sorted({"accelerator", "devices"} & set(changes))
        if both:
            raise ConfigError(
                f"node-config 'gpus' and '{both[0]}' both choose this site's devices; "
                'keep one (gpus="0,1" is accelerator="gpu" devices=[0, 1])'
            )
        try:
            changes.update(accelerator="gpu", devices=parse_devices(gpus))
        except ValueError as error:
            raise ConfigError(f"node-config 'gpus': {error}") from None
    if not changes:
        return cfg
    try:
        changes = {k: trainer_value(k, v) for k, v in changes.items()}
        trainer = dataclasses.replace(cfg.trainer, **changes)
        validate_trainer(trainer, cfg.output.client_logs)
        site = dataclasses.replace(cfg, trainer=trainer)
        check_client_devices(site)
    except ConfigError as error:
        raise ConfigError(f"node-config {show(changes)}: {error}") from None
    return site


def _with_site_data(cfg: Config, node_config: typing.Mapping[str, Any]) -> Config:
    """`cfg` reading this SuperNode's own data folder, if its node config names one.

    `data-root` becomes `data.root` (built-in datasets) or the DataModule's `root` init
    argument, and the data is not partitioned (`data.partition: site`): the folder is the
    site's. A DataModule that takes `partition_id` still gets it and decides for itself.
    """
    root = str(node_config.get("data-root", "")).strip()
    if not root:
        return cfg
    check_path_length(root, "node-config 'data-root'")
    if not Path(root).is_absolute():
        raise ConfigError(
            f"node-config 'data-root' is {root!r}; give the site's data folder as an absolute path"
        )
    data = cfg.data
    if data.class_path is None:
        data = dataclasses.replace(data, root=root, partition="site")
    else:
        import inspect

        from fl_lightning.config.class_path import import_class

        cls = import_class(data.class_path, "data.class_path")
        params = inspect.signature(cls).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "root" not in params and not takes_any:
            raise ConfigError(
                f"node-config 'data-root': {cls.__name__} takes no `root` argument to read a "
                "site's folder from; add one, or leave data-root out"
            )
        init_args = {**data.init_args, "root": root}
        data = dataclasses.replace(data, init_args=init_args, partition="site")
    return dataclasses.replace(cfg, data=data)


def _node_int(node_config: typing.Mapping[str, Any], key: str) -> int:
    value = node_config[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    raise ConfigError(
        f"node-config '{key}' is {show(value)}, not an integer: start the SuperNode with "
        f"--node-config 'partition-id=K num-partitions=N'"
    )
