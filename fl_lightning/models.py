"""The run's LightningModule: the seed report's networks (Tables I, II), the seed MLP, or yours."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from fl_lightning.class_path import ClassSpec, instantiate
from fl_lightning.config import Config, input_shape
from fl_lightning.errors import ConfigError
from fl_lightning.module import ImageClassifier


class MNISTNet(ImageClassifier):
    """Table I: two 5x5 convolutions with max pooling, then 1024-120-84-10 (1x28x28 input)."""

    input_shape = (1, 28, 28)

    def build_network(self) -> nn.Module:
        """Conv(1,32,5) > pool > Conv(32,64,5) > pool > FC 1024-120-84-classes."""
        return nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5),
            self.activation(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5),
            self.activation(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 120),
            self.activation(),
            nn.Linear(120, 84),
            self.activation(),
            nn.Linear(84, self.hparams["num_classes"]),
        )


class CIFAR10Net(ImageClassifier):
    """Table II: three 3x3 conv-BatchNorm-pool blocks, then 4096-512-(dropout 0.5)-256-10."""

    input_shape = (3, 32, 32)

    def build_network(self) -> nn.Module:
        """Conv 64/128/256 with BatchNorm and pooling, then FC 4096-512-256-classes."""

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                self.activation(),
                nn.MaxPool2d(2),
            ]

        return nn.Sequential(
            *block(3, 64),
            *block(64, 128),
            *block(128, 256),
            nn.Flatten(),
            nn.Linear(256 * 4 * 4, 512),
            self.activation(),
            nn.Dropout(0.5),
            nn.Linear(512, 256),
            self.activation(),
            nn.Linear(256, self.hparams["num_classes"]),
        )


class MLP(ImageClassifier):
    """The noisy-clients seed's network: flatten, one hidden layer of 128 ReLU units."""

    def __init__(self, in_features: int = 784, hidden_features: int = 128, **kwargs: Any) -> None:
        self.in_features = in_features
        self.hidden_features = hidden_features
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_network(self) -> nn.Module:
        """Flatten > Linear(in, 128) > ReLU > Linear(128, classes)."""
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.in_features, self.hidden_features),
            self.activation(),
            nn.Linear(self.hidden_features, self.hparams["num_classes"]),
        )


MODELS: dict[str, type[ImageClassifier]] = {
    "mnist_net": MNISTNet,
    "cifar10_net": CIFAR10Net,
    "mlp": MLP,
}


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
        from fl_lightning.dp_sgd import make_private_compatible

        model = make_private_compatible(model, label)
    return model


def builtin_spec(cfg: Config, num_classes: int | None = None) -> ClassSpec:
    """What `model.name` is short for: the built-in class, its init_args from the config."""
    assert cfg.model.name is not None  # config validation: a name or a class path
    if num_classes is None:
        from fl_lightning.data import load_splits  # cached per process

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
    return ClassSpec(f"{cls.__module__}.{cls.__qualname__}", kwargs)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether `model` keeps BatchNorm running statistics (what batchnorm=recompute measures)."""
    return any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in model.modules()
    )
