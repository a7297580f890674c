"""The Lightning Trainer both sides make: quiet, from the `trainer` section, and what it logged.

A client's Trainer trains and validates; the server's tests the global model. Both come
from `make_trainer`, and both read the module's logged metrics with `logged_metrics`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

from fl_lightning.config.class_path import instantiate
from fl_lightning.config.schema import TrainerConfig
from fl_lightning.config.trainer_flags import first_device_index
from fl_lightning.errors import ClientError
from fl_lightning.vocabulary import MAX_METRICS, RESERVED_METRICS


@functools.cache
def setup_lightning_process() -> None:
    """Set this process up for many short Trainers: quiet, and callback factories read once.

    Process-wide, and once per process (cached): called where a process enters
    fl-lightning (the CLI, the ClientApp and ServerApp, a DDP rank), never by the library
    code they call.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # num_workers=0 is deliberate (in-memory tensors), so the "bottleneck" hint is noise.
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    # Raised inside Lightning 2.6 by torch >= 2.10's pytree API; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    _read_entry_points_once()


def _read_entry_points_once() -> None:
    """Have Lightning look up its callback-factory entry points once per process.

    Every Trainer's construction reads the entry points of every installed package to find
    `lightning.pytorch.callbacks_factory` plugins: about 9 ms, nearly half of a small
    client's fixed cost per message (benchmarks/client_message.py). The installed packages
    do not change while a worker runs; the factories found are still called for every
    Trainer, as Lightning does.
    """
    from lightning.fabric.utilities import registry

    lookup = getattr(registry, "entry_points", None)
    if lookup is not None:  # else another Lightning layout: nothing to speed up
        registry.entry_points = functools.cache(lookup)  # type: ignore[assignment]


def user_callbacks(cfg: TrainerConfig) -> list[Callback]:
    """The `trainer.callbacks` the config names, built fresh for one Trainer."""
    return [
        instantiate(spec, f"trainer.callbacks[{i}]", Callback)
        for i, spec in enumerate(cfg.callbacks)
    ]


def make_trainer(cfg: TrainerConfig, **overrides: Any) -> L.Trainer:
    """A Trainer from the `trainer` section; no logger (unless overridden) nor checkpoints."""
    kwargs = cfg.kwargs()
    kwargs.update(logger=False, enable_checkpointing=False)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def evaluation_stage(model: L.LightningModule) -> Literal["test", "validate"] | None:
    """How the server tests a global model: the module's `test_step`, else its
    `validation_step` (on the test data), else not at all."""
    if is_overridden("test_step", model):
        return "test"
    if is_overridden("validation_step", model):
        return "validate"
    return None


def missing_steps(model: L.LightningModule) -> list[str]:
    """What the run does without the module's test or validation step, said once at load."""
    name, lines = type(model).__name__, []
    stage = evaluation_stage(model)
    if stage != "test":
        how = "with its validation_step on the test data" if stage else "not at all"
        lines.append(f"{name} has no test_step: the server tests the global model {how}")
    if not is_overridden("validation_step", model):
        lines.append(f"{name} has no validation_step: clients are not asked to evaluate")
    return lines


def evaluate(
    trainer: L.Trainer,
    model: L.LightningModule,
    loader: DataLoader,
    stage: Literal["test", "validate"],
) -> dict[str, float]:
    """Run the module's test or validation loop over `loader`; its metrics as logged."""
    run = trainer.test if stage == "test" else trainer.validate
    run(model, dataloaders=loader, verbose=False)
    # Not run()'s result: it names a value logged per step and per epoch `name_epoch`,
    # where training's metrics keep `name`; callback_metrics holds both.
    return logged_metrics(trainer.callback_metrics)


def one_device(cfg: TrainerConfig) -> int | list[int]:
    """`devices` for evaluation: the first of the configured ones (DDP would shard the data)."""
    index = first_device_index(cfg)
    return [index] if index is not None else 1


def logged_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The module's logged scalars as floats: what a reply carries under the same names.

    A value logged both per step and per epoch appears as `name`, `name_step` and
    `name_epoch`; only `name` (the epoch's) is kept.
    """
    result: dict[str, float] = {}
    for key, value in metrics.items():
        if key.endswith(("_step", "_epoch")) and key.rsplit("_", 1)[0] in metrics:
            continue
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            continue  # not a scalar: nothing to average
        if key in RESERVED_METRICS:
            raise ClientError(
                f"the module logs {key!r}, a name fl-lightning's replies reserve; rename it"
            )
        result[str(key)] = float(value)
    if len(result) > MAX_METRICS:
        raise ClientError(
            f"the module logs {len(result)} metrics; a reply carries at most {MAX_METRICS}"
        )
    return result
