"""`trainer.*` checked against the values `lightning.Trainer` itself accepts.

Lightning is imported only when a flag differs from its default: importing it costs seconds,
and the config is loaded before anything else needs it.
"""

from __future__ import annotations

import logging
import typing
from typing import Any

from fl_lightning.config.class_path import ClassSpec
from fl_lightning.config.schema import TrainerConfig
from fl_lightning.config.yaml_input import key_text
from fl_lightning.errors import ConfigError, check, closest, show

# Trainer keywords fl-lightning sets itself in every client's Trainer, and why.
OWNED_TRAINER_KEYS = {
    "logger": "the server logs every round to TensorBoard and metrics.jsonl",
    "enable_checkpointing": "the server checkpoints the global model every round",
}


def trainer_extras(raw: dict[str, Any]) -> dict[str, Any]:
    """The `trainer.*` keys beyond TrainerConfig's own, each a `lightning.Trainer` keyword."""
    if not raw:
        return {}
    import inspect

    from lightning.pytorch import Trainer

    accepted = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in raw:
        if key in OWNED_TRAINER_KEYS:
            raise ConfigError(
                f"trainer.{key}: is set by fl-lightning ({OWNED_TRAINER_KEYS[key]}); remove it"
            )
        if key not in accepted:
            close = closest(key, accepted)
            hint = f" (did you mean 'trainer.{close}'?)" if close else ""
            raise ConfigError(f"trainer.{key_text(key)}: not a lightning.Trainer keyword{hint}")
    return dict(raw)


def validate_trainer(t: TrainerConfig, client_logs: bool = False) -> None:
    """Reject `trainer.*` values Lightning's Trainer would refuse or this project cannot run.

    `client_logs` (output.client_logs) gives clients a logger, which some callbacks need.
    """
    check(t.max_epochs >= 1, "trainer.max_epochs", f"must be >= 1, got {t.max_epochs}")
    check(
        t.gradient_clip_val is None or t.gradient_clip_val > 0,
        "trainer.gradient_clip_val",
        f"must be > 0 or null, got {t.gradient_clip_val}",
    )
    check(
        t.accumulate_grad_batches >= 1,
        "trainer.accumulate_grad_batches",
        f"must be >= 1, got {t.accumulate_grad_batches}",
    )
    if _differs_from_default(t, LIGHTNING_CHECKED_FLAGS):
        # Importing Lightning costs seconds (the CLI loads the config before it would),
        # and the defaults are valid: only a changed flag is checked against Lightning.
        _check_lightning_flags(t)
    _check_devices(t)
    if t.extra:
        _check_extra_values(t)
    for index, spec in enumerate(t.callbacks):
        _check_callback(spec, f"trainer.callbacks[{index}]", client_logs)


def _check_callback(spec: ClassSpec, key: str, client_logs: bool) -> None:
    """A callback a client's Trainer can run, built once here (and dropped): a value its
    constructor refuses (EarlyStopping's `mode: sideways`) fails now, not in every client
    after the run has started. Clients build their own for each Trainer."""
    from lightning.pytorch.callbacks import (
        Callback,
        Checkpoint,
        DeviceStatsMonitor,
        LearningRateMonitor,
    )

    from fl_lightning.config.class_path import check_init_args, import_class, instantiate

    cls = import_class(spec.class_path, f"{key}.class_path", Callback)
    check(
        client_logs or not issubclass(cls, (LearningRateMonitor, DeviceStatsMonitor)),
        f"{key}.class_path",
        f"{spec.class_path} needs a Trainer logger, and clients train without one "
        f"({OWNED_TRAINER_KEYS['logger']}); set output.client_logs=true (each client's own "
        "TensorBoard run), or remove it",
    )
    check(
        not issubclass(cls, Checkpoint),
        f"{key}.class_path",
        f"{spec.class_path}: {OWNED_TRAINER_KEYS['enable_checkpointing']} (last.ckpt in "
        "the run directory); a client's own checkpoints would hold one round of one "
        "client; remove it",
    )
    check_init_args(cls, spec.init_args, key, given=set())
    instantiate(spec, key, Callback)


# Trainer flags whose accepted values only Lightning knows; checked against Lightning itself.
LIGHTNING_CHECKED_FLAGS = ("accelerator", "devices", "strategy", "precision", "limit_train_batches")
# Strategies a client runs: one device in its own process, or several as DDP in processes
# spawned for the round (`ddp` re-runs the script, which a Ray worker or a ClientApp is not).
CLIENT_STRATEGIES = (
    "auto",
    "single_device",
    "ddp",
    "ddp_spawn",
    "ddp_find_unused_parameters_true",
    "ddp_spawn_find_unused_parameters_true",
)


def _differs_from_default(t: TrainerConfig, names: tuple[str, ...]) -> bool:
    default = TrainerConfig()
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


def first_device_index(t: TrainerConfig) -> int | None:
    """The first device index `devices` names ([2, 3], "2,3"); None for a count (2, "2")."""
    if isinstance(t.devices, list):
        return t.devices[0]
    if isinstance(t.devices, str) and "," in t.devices:
        return int(next(item for item in t.devices.split(",") if item.strip()))
    return None


def _check_devices(t: TrainerConfig) -> None:
    """A number of devices per client, and a strategy a client can run them with.

    Several devices train as DDP in processes spawned for the round
    (`fl_lightning.client.ddp`): `ddp` and `ddp_spawn` both name it. One device trains in
    the client's own process whatever the strategy, so a site may override `devices=1`.
    """
    count = device_count(t)
    check(
        count is not None,
        "trainer.devices",
        f"{show(t.devices)} trains each client on every visible device, a number this "
        "config cannot check resources for; give the number, e.g. trainer.devices=2",
    )
    check(
        t.strategy.lower() in CLIENT_STRATEGIES,
        "trainer.strategy",
        f"{show(t.strategy)} is not supported inside a client; use auto (one device) or ddp "
        "(several devices: Lightning's DDP in processes spawned for each round)",
    )
    if count is not None and count > 1:
        check(
            t.accelerator != "auto",
            "trainer.accelerator",
            f"auto with trainer.devices={show(t.devices)}: name cpu or gpu, so that each "
            "client reserves the CPUs or GPUs its processes run on",
        )
        check(
            t.strategy.lower() != "single_device",
            "trainer.strategy",
            f"single_device trains on one device, and trainer.devices={show(t.devices)} "
            "names several; use ddp",
        )


def _check_extra_values(t: TrainerConfig) -> None:
    """Lightning's own check of the extra keywords: a Trainer built with them on one CPU."""
    from lightning.pytorch import Trainer

    kwargs = {**t.extra, "accelerator": "cpu", "devices": 1, "strategy": "auto"}
    chatter = logging.getLogger("lightning.pytorch")  # device banners, tips
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        Trainer(**kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    except Exception as err:  # Lightning's MisconfigurationException, TypeError, ValueError
        names = ", ".join(f"trainer.{k}" for k in t.extra)
        raise ConfigError(f"{names}: lightning.Trainer refused them: {err}") from None
    finally:
        chatter.setLevel(level)


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
    check(
        t.accelerator in accelerators,
        "trainer.accelerator",
        f"{show(t.accelerator)} is not a Lightning accelerator; use one of "
        f"{', '.join(accelerators)}",
    )
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    check(
        t.strategy.lower() in strategies,
        "trainer.strategy",
        f"{show(t.strategy)} is not a Lightning strategy; use auto, or ddp for several devices",
    )
    precisions = [
        *typing.get_args(_PRECISION_INPUT_STR),
        *typing.get_args(_PRECISION_INPUT_INT),
        *typing.get_args(_PRECISION_INPUT_STR_ALIAS),
    ]
    check(
        t.precision in precisions,
        "trainer.precision",
        f"{show(t.precision)} is not a Lightning precision; use one of "
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
    check(devices not in ([], 0, "0"), "trainer.devices", f"{show(devices)} is not {usage}")
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
        raise ConfigError(f"trainer.devices: {show(devices)} is not {usage} ({err})") from None
    check(not bad, "trainer.devices", f"{show(devices)} is not {usage}")


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
            f">= 1, got {show(limit)}"
        ) from None
    # Lightning accepts 0 (no training at all); a federated round that trains nothing
    # would send the global model back as an update.
    check(
        limit > 0,
        "trainer.limit_train_batches",
        "is 0, so clients would train nothing; use null (every batch) or a value > 0",
    )
