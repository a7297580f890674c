"""Building the run's LightningModule: yours by `model.class_path`, or a built-in by name."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from fl_lightning.config.class_path import ClassSpec, instantiate
from fl_lightning.config.schema import Config, input_shape
from fl_lightning.errors import ConfigError
from fl_lightning.models.networks import MODELS
from fl_lightning.models.state_dict import personal_keys

# Where the built-in classes are named from, as a config names them (`models/__init__.py`).
PUBLIC_PATH = "fl_lightning.models"


def build_model(cfg: Config, num_classes: int | None = None) -> pl.LightningModule:
    """The run's LightningModule: `model.class_path` with its init_args, or built-in `model.name`.

    `strategy.batchnorm: recompute` needs BatchNorm layers, found by inspecting the module.
    Under differential privacy, BatchNorm is replaced as Opacus requires, on the server and
    on every client alike (so both hold the same state keys). `num_classes` sizes a
    built-in model (default: the built-in dataset's).
    """
    m = cfg.model
    if m.class_path is not None:
        spec = ClassSpec(m.class_path, dict(m.init_args))
        label = f"model.class_path: {m.class_path}"
    else:
        spec, label = builtin_spec(cfg, num_classes), f"model.name: {m.name}"
    model = instantiate(spec, "model", pl.LightningModule)
    if cfg.strategy.batchnorm == "recompute" and not has_batchnorm(model):
        raise ConfigError(
            f"strategy.batchnorm: recompute changes only BatchNorm statistics, and {label} "
            "has no BatchNorm layer; use strategy.batchnorm=average"
        )
    if cfg.privacy.mode != "none":
        from fl_lightning.privacy.dp_sgd import make_private_compatible

        model = make_private_compatible(model, label)
    if cfg.strategy.local_parameters:
        _check_personal(model, cfg.strategy.local_parameters, label)
    return model


def _check_personal(model: torch.nn.Module, patterns: tuple[str, ...], label: str) -> None:
    """Personal layers that match something, and not everything, of the module."""
    keys = list(model.state_dict())
    personal = personal_keys(keys, patterns)
    if not personal or len(personal) == len(keys):
        what = "none" if not personal else "all"
        raise ConfigError(
            f"strategy.local_parameters: {list(patterns)} match {what} of the {len(keys)} "
            f"state-dict entries of {label} (e.g. {', '.join(keys[:4])}); name the layers "
            "each client keeps, such as '.*bn.*' or 'net\\.4\\..*'"
        )


def builtin_spec(cfg: Config, num_classes: int | None = None) -> ClassSpec:
    """What `model.name` is short for: the built-in class, its init_args from the config."""
    assert cfg.model.name is not None  # config validation: a name or a class path
    if num_classes is None:
        from fl_lightning.data.datasets import load_splits  # cached per process

        num_classes = load_splits(cfg.data).num_classes
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "optimizer": cfg.optimizer.name,
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.weight_decay,
        "momentum": cfg.optimizer.momentum,
        "scheduler": cfg.optimizer.scheduler,
        "label_smoothing": cfg.model.label_smoothing,
        "activation": cfg.model.activation,
    }
    shape = input_shape(cfg.data)
    if cfg.model.name == "mlp":
        kwargs["in_features"] = shape[0] * shape[1] * shape[2]
    cls = MODELS[cfg.model.name]
    # A DataModule's shapes are the user's to match; the built-in data's are checked here.
    if cfg.data.class_path is None and cls.input_shape not in (None, shape):
        raise ConfigError(
            f"model.name: {cfg.model.name} takes inputs of shape {cls.input_shape}, but "
            f"data.dataset={cfg.data.dataset} yields {shape}; pick a matching model (e.g. mlp)"
        )
    return ClassSpec(f"{PUBLIC_PATH}.{cls.__qualname__}", kwargs)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether `model` keeps BatchNorm running statistics (what batchnorm=recompute measures)."""
    return any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in model.modules()
    )
