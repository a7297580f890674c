"""`trainer.*` checked against the values `lightning.Trainer` itself accepts.

Lightning is imported only when a flag differs from its default: importing it costs seconds,
and the config is loaded before anything else needs it.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING

from fl_lightning.errors import ConfigError
from fl_lightning.yaml_input import _show

if TYPE_CHECKING:
    from fl_lightning.config import TrainerConfig


def validate_trainer(t: TrainerConfig) -> None:
    """Reject `trainer.*` values Lightning's Trainer would refuse or this project cannot run."""
    _check(t.max_epochs >= 1, "trainer.max_epochs", f"must be >= 1, got {t.max_epochs}")
    _check(
        t.gradient_clip_val is None or t.gradient_clip_val > 0,
        "trainer.gradient_clip_val",
        f"must be > 0 or null, got {t.gradient_clip_val}",
    )
    _check(
        t.accumulate_grad_batches >= 1,
        "trainer.accumulate_grad_batches",
        f"must be >= 1, got {t.accumulate_grad_batches}",
    )
    if _differs_from_default(t, LIGHTNING_CHECKED_FLAGS):
        # Importing Lightning costs seconds (the CLI loads the config before it would),
        # and the defaults are valid: only a changed flag is checked against Lightning.
        _check_lightning_flags(t)
    _check_one_device(t)


# Trainer flags whose accepted values only Lightning knows; checked against Lightning itself.
LIGHTNING_CHECKED_FLAGS = ("accelerator", "devices", "strategy", "precision", "limit_train_batches")
# Lightning strategies that train on one device in the client's own process.
SINGLE_DEVICE_STRATEGIES = ("auto", "single_device")


def _differs_from_default(t: TrainerConfig, names: tuple[str, ...]) -> bool:
    # TrainerConfig(), built from t's own class: config.py imports this module, so this
    # module does not import config's classes back.
    default = type(t)()
    return any(getattr(t, name) != getattr(default, name) for name in names)


def device_count(t: TrainerConfig) -> int | None:
    """Devices each client's Trainer would use; None: every visible one (unknown here)."""
    devices = t.devices
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            # Lightning's CPU accelerator counts 1 device for "auto" (auto_device_count).
            return 1 if t.accelerator == "cpu" and text == "auto" else None
        if "," in text:
            return len([item for item in text.split(",") if item.strip()])
        return int(text) if text.isdecimal() else None
    return None if devices == -1 else devices


def _check_one_device(t: TrainerConfig) -> None:
    """Item 9 of issue #18: settings that train a client on several devices cannot run yet."""
    count = device_count(t)
    what = "every visible device" if count is None else f"{count} devices"
    _check(
        count == 1,
        "trainer.devices",
        f"{_show(t.devices)} trains each client on {what}, and several devices per client "
        "is not supported yet (issue #20); set trainer.devices=1",
    )
    # A multi-process strategy on one device only adds a process group (and DDP kills the
    # client's Ray worker on several): each client trains in its own process, on one device.
    _check(
        t.strategy.lower() in SINGLE_DEVICE_STRATEGIES,
        "trainer.strategy",
        f"{_show(t.strategy)} is a multi-device strategy, and several devices per client is "
        "not supported yet (issue #20); set trainer.strategy=auto trainer.devices=1",
    )


def _check_lightning_flags(t: TrainerConfig) -> None:
    """Check the Trainer flags against the values `lightning.Trainer` itself accepts."""
    from lightning.fabric.plugins.precision.precision import (
        _PRECISION_INPUT_INT,
        _PRECISION_INPUT_STR,
        _PRECISION_INPUT_STR_ALIAS,
    )
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    # As Lightning's _AcceleratorConnector._check_config_and_set_final_flags does.
    accelerators = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    _check(
        t.accelerator in accelerators,
        "trainer.accelerator",
        f"{_show(t.accelerator)} is not a Lightning accelerator; use one of "
        f"{', '.join(accelerators)}",
    )
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    _check(
        t.strategy.lower() in strategies,
        "trainer.strategy",
        f"{_show(t.strategy)} is not a Lightning strategy; use auto (one device per client)",
    )
    precisions = [
        *typing.get_args(_PRECISION_INPUT_STR),
        *typing.get_args(_PRECISION_INPUT_INT),
        *typing.get_args(_PRECISION_INPUT_STR_ALIAS),
    ]
    _check(
        t.precision in precisions,
        "trainer.precision",
        f"{_show(t.precision)} is not a Lightning precision; use one of "
        f"{', '.join(dict.fromkeys(str(p) for p in precisions))}",
    )
    _check_lightning_devices(t)
    _check_limit_train_batches(t)


def _check_lightning_devices(t: TrainerConfig) -> None:
    """`trainer.devices` parsed as Lightning parses it, without asking which devices exist.

    The config is also loaded where the clients do not run (a server, a laptop that
    starts a Ray cluster), so only the form of the value is checked here, not whether
    this machine has those devices.
    """
    from lightning.fabric.utilities import device_parser
    from lightning.pytorch.accelerators import CPUAccelerator

    devices = t.devices
    usage = 'an int >= 1, "auto", a list of device indices or a string like "0,1"'
    # Lightning's _check_device_config_and_set_final_flags refuses these for every accelerator.
    _check(devices not in ([], 0, "0"), "trainer.devices", f"{_show(devices)} is not {usage}")
    try:
        if t.accelerator == "cpu":
            if devices == "auto":
                devices = CPUAccelerator.auto_device_count()
            CPUAccelerator.parse_devices(devices)  # type: ignore[arg-type]
            return
        if devices == "auto":
            return
        device_parser._check_data_type(devices)
        parsed = device_parser._normalize_parse_gpu_string_input(devices)
        if isinstance(parsed, list):
            device_parser._check_unique(parsed)
            bad = any(d < 0 for d in parsed)
        else:
            bad = parsed < -1
    except (TypeError, ValueError, device_parser.MisconfigurationException) as err:
        raise ConfigError(f"trainer.devices: {_show(devices)} is not {usage} ({err})") from None
    _check(not bad, "trainer.devices", f"{_show(devices)} is not {usage}")


def _check_limit_train_batches(t: TrainerConfig) -> None:
    """`trainer.limit_train_batches` as Lightning's _determine_batch_limits reads it."""
    from lightning.pytorch.trainer.setup import _determine_batch_limits
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    limit = t.limit_train_batches
    if limit is None or limit == 1:
        return  # valid; and Lightning would log an info line for exactly 1
    try:
        _determine_batch_limits(limit, "limit_train_batches")
    except MisconfigurationException:
        raise ConfigError(
            f"trainer.limit_train_batches: must be a share in (0, 1] or a number of batches "
            f">= 1, got {_show(limit)}"
        ) from None
    # Lightning accepts 0 (no training at all); a federated round that trains nothing
    # would send the global model back as an update.
    _check(
        limit > 0,
        "trainer.limit_train_batches",
        "is 0, so clients would train nothing; use null (every batch) or a value > 0",
    )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")
