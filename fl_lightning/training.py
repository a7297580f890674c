"""A client's work on the global model: `Trainer.fit` on its partition, `validate` on hold-out."""

from __future__ import annotations

import functools
import itertools
import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.optim.swa_utils import update_bn

from fl_lightning.config import BATCHNORM_STATISTICS, Config, TrainerConfig
from fl_lightning.datamodule import FederatedDataModule
from fl_lightning.models import build_model
from fl_lightning.module import ImageClassifier


@dataclass(frozen=True)
class ClientResult:
    """A client's reply: weights (train only), metrics and the number of examples behind them."""

    state_dict: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    num_examples: int
    accountant_state: str | None = None  # DP-SGD: the client's accountant after this round


def quiet_lightning() -> None:
    """Silence Lightning's per-Trainer chatter (device banners, num_workers hints) in clients."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # num_workers=0 is deliberate (in-memory tensors), so the "bottleneck" hint is noise.
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    # Raised inside Lightning 2.6 by torch >= 2.10's pytree API; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def make_trainer(cfg: TrainerConfig, **overrides: Any) -> L.Trainer:
    """A Trainer from the `trainer` section, without loggers or checkpoints of its own."""
    kwargs = asdict(cfg)
    if kwargs["limit_train_batches"] is None:
        del kwargs["limit_train_batches"]
    kwargs.update(logger=False, enable_checkpointing=False)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def one_device(cfg: TrainerConfig) -> int | list[int]:
    """`devices` for evaluation: the first of the configured ones (DDP would shard the data)."""
    return [cfg.devices[0]] if isinstance(cfg.devices, list) else 1


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed for one client in one round, independent of every other (client, round)."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def _load(
    cfg: Config,
    dm: FederatedDataModule,
    state_dict: dict[str, torch.Tensor],
    lr: float | None = None,
) -> ImageClassifier:
    model = build_model(cfg, dm.splits.num_classes, lr=lr)
    model.load_state_dict(state_dict)
    return model


def fit(
    cfg: Config,
    state_dict: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
    lr: float | None = None,
    proximal_mu: float = 0.0,
    max_epochs: int | None = None,
    accountant_state: str | None = None,
) -> ClientResult:
    """Train the global weights on one client's partition for `trainer.max_epochs` epochs.

    `lr` is the round's learning rate sent by the server (default: optimizer.lr),
    `proximal_mu` FedProx's penalty, `max_epochs` overrides trainer.max_epochs.
    Under DP-SGD, `accountant_state` is the client's accountant from its previous round.
    """
    quiet_lightning()
    seed = client_seed(cfg.seed, server_round, partition_id)
    L.seed_everything(seed, verbose=False)  # dropout, augmentation
    dm = FederatedDataModule(cfg.data, cfg.seed, partition_id, num_partitions, shuffle_seed=seed)
    model = _load(cfg, dm, state_dict, lr=lr)
    model.set_proximal_anchor(proximal_mu)
    epochs = {} if max_epochs is None else {"max_epochs": max_epochs}
    callbacks = []
    if cfg.optimizer.ema_decay is not None:
        # The average (buffers included) starts at the first step's weights; fit ends with it.
        callbacks.append(EMAWeightAveraging(decay=cfg.optimizer.ema_decay))
    trainer = make_trainer(cfg.trainer, limit_val_batches=0, callbacks=callbacks, **epochs)
    loader = dm.train_dataloader()
    dp = None
    if cfg.privacy.mode == "dp_sgd":
        from fl_lightning.dp_sgd import ClientDPSGD

        dp = ClientDPSGD(cfg, len(dm.train_indices), accountant_state, seed)
        loader = dp.loader(loader)
        model.private_optimizer = functools.partial(dp.make_private, loader=loader)
    trainer.fit(model, train_dataloaders=loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dp is None:
        return ClientResult(state, metrics, num_examples=len(dm.train_indices))
    metrics["privacy/epsilon"] = dp.epsilon()
    return ClientResult(state, metrics, len(dm.train_indices), accountant_state=dp.state())


def batchnorm_statistics(
    cfg: Config,
    state_dict: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
) -> ClientResult:
    """BatchNorm running statistics of the global weights, measured on the client's data.

    A forward pass in training mode, without gradients, over up to
    `strategy.batchnorm_batches` training batches (torch's `update_bn`: a cumulative
    average over the batches). The reply holds only the BatchNorm running means and
    variances; `num_examples` counts the samples behind them.
    """
    quiet_lightning()
    seed = client_seed(cfg.seed, server_round, partition_id)
    L.seed_everything(seed, verbose=False)  # augmentation, as in training
    dm = FederatedDataModule(cfg.data, cfg.seed, partition_id, num_partitions, shuffle_seed=seed)
    model = _load(cfg, dm, state_dict)
    device = _first_device(cfg.trainer)
    model.to(device)
    batches = list(itertools.islice(dm.train_dataloader(), cfg.strategy.batchnorm_batches))
    update_bn(batches, model, device=device)
    keys = [k for k in state_dict if k.endswith(BATCHNORM_STATISTICS)]
    state = model.state_dict()
    statistics = {k: state[k].detach().cpu() for k in keys}
    return ClientResult(statistics, {}, num_examples=sum(len(labels) for _, labels in batches))


def _first_device(cfg: TrainerConfig) -> torch.device:
    """The device evaluation runs on (see `one_device`), as a torch.device."""
    if cfg.accelerator in ("gpu", "cuda") or (
        cfg.accelerator == "auto" and torch.cuda.is_available()
    ):
        index = cfg.devices[0] if isinstance(cfg.devices, list) else 0
        return torch.device("cuda", index)
    return torch.device("cpu")


def validate(
    cfg: Config,
    state_dict: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
) -> ClientResult:
    """Evaluate the global weights on one client's held-out validation samples."""
    quiet_lightning()
    dm = FederatedDataModule(cfg.data, cfg.seed, partition_id, num_partitions)
    model = _load(cfg, dm, state_dict)
    trainer = make_trainer(cfg.trainer, devices=one_device(cfg.trainer), strategy="auto")
    (metrics,) = trainer.validate(model, dataloaders=dm.val_dataloader(), verbose=False)
    return ClientResult(None, {k: float(v) for k, v in metrics.items()}, len(dm.val_indices))
