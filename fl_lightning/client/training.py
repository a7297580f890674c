"""A client's work on the global model: `Trainer.fit` on its data, `validate` on its hold-out.

Whatever the module (built-in or the user's), the Trainer runs the loop and the module's
own steps, optimizers and `self.log` calls; federated pieces come in as callbacks
(`fl_lightning.client.callbacks`, `fl_lightning.privacy.dp_sgd.PrivateOptimizer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch.optim.swa_utils import update_bn

from fl_lightning.client.callbacks import FedProx, RoundLearningRate, Scaffold
from fl_lightning.config.privacy_rules import check_client_devices
from fl_lightning.config.schema import (
    BATCHNORM_STATISTICS,
    Config,
    TrainerConfig,
    keeps_client_state,
)
from fl_lightning.config.trainer_flags import device_count, first_device_index
from fl_lightning.data.client_datamodule import client_datamodule
from fl_lightning.data.loaders import ClientData, client_data
from fl_lightning.errors import ClientError
from fl_lightning.models.build import build_model
from fl_lightning.models.state_dict import personal_keys
from fl_lightning.models.trainer import (
    logged_metrics,
    make_trainer,
    one_device,
    user_callbacks,
)
from fl_lightning.seeding import derive, seeded
from fl_lightning.vocabulary import EPSILON_METRIC, FIT_SECONDS, SETUP_SECONDS

if TYPE_CHECKING:
    from fl_lightning.privacy.dp_sgd import ClientDPSGD


@dataclass(frozen=True)
class ClientResult:
    """A client's reply: weights (train only), metrics and the number of examples behind them."""

    state_dict: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    num_examples: int
    accountant_state: str | None = None  # DP-SGD: the client's accountant after this round
    seconds: dict[str, float] = field(default_factory=dict)  # train: SETUP_SECONDS, FIT_SECONDS
    control_delta: dict[str, torch.Tensor] | None = None  # SCAFFOLD: the change of c_i


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed for one client in one round, independent of every other (client, round)."""
    return derive(seed, "client", server_round, partition_id)


def _load(cfg: Config, state_dict: dict[str, torch.Tensor]) -> L.LightningModule:
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    return model


def fit(
    cfg: Config,
    state_dict: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
    lr_factor: float = 1.0,
    proximal_mu: float = 0.0,
    max_epochs: int | None = None,
    accountant_state: str | None = None,
    control: dict[str, torch.Tensor] | None = None,
) -> ClientResult:
    """Train the global weights on one client's data for `trainer.max_epochs` epochs.

    `lr_factor` scales the module's learning rates (the server's schedule across rounds),
    `proximal_mu` is FedProx's penalty, `max_epochs` overrides trainer.max_epochs. Under
    DP-SGD, `accountant_state` is the client's accountant from its previous round; under
    SCAFFOLD, `control` is the server's control variate, and the result holds the change
    of the client's own.
    """
    started = time.perf_counter()
    seed = client_seed(cfg.seed, server_round, partition_id)
    with seeded(seed):  # dropout, augmentation; the process's RNGs are restored after
        data = client_data(cfg, partition_id, num_partitions, seed)
        model = _load(cfg, state_dict)
        scaffold = Scaffold(control) if control is not None else None
        callbacks = _federated_callbacks(cfg, lr_factor, proximal_mu, scaffold)
        if server_round >= 1:  # round 0: client_report's local model, which keeps nothing
            callbacks += _kept_state(cfg, model, partition_id, server_round, scaffold)
        kwargs: dict[str, Any] = {} if max_epochs is None else {"max_epochs": max_epochs}
        if cfg.output.client_logs and server_round >= 1:  # round 0: client_report's local model
            from fl_lightning.client.logs import client_logging

            kwargs["logger"], steps = client_logging(cfg.output.dir, partition_id, server_round)
            callbacks.append(steps)
        loader, dp = data.train, None
        if cfg.privacy.mode == "dp_sgd":
            from fl_lightning.privacy.dp_sgd import ClientDPSGD, PrivateOptimizer

            dp = ClientDPSGD(cfg, data.num_train, accountant_state, seed)
            loader = dp.loader(loader)
            callbacks.append(PrivateOptimizer(dp, loader))
        kwargs["callbacks"] = callbacks
        split = (partition_id, num_partitions, seed)
        trainer, ready = _run_fit(cfg, model, data, loader, split, kwargs)
        seconds = {SETUP_SECONDS: ready - started, FIT_SECONDS: time.perf_counter() - ready}
        # Personal layers never leave the client (round 0's local model keeps them all).
        kept = personal_keys(state_dict, cfg.strategy.local_parameters) if server_round else []
        result = _fitted(model, trainer, data.num_train, dp, seconds, set(kept))
        delta = scaffold.delta if scaffold is not None else None
        return dataclasses.replace(result, control_delta=delta)


def _run_fit(
    cfg: Config,
    model: L.LightningModule,
    data: ClientData,
    loader: Any,
    split: tuple[int, int, int],
    kwargs: dict[str, Any],
) -> tuple[L.Trainer, float]:
    """`Trainer.fit` on one device, or as DDP over `trainer.devices` ranks; the Trainer,
    and when fit began. `split` is (partition_id, num_partitions, seed)."""
    ranks = device_count(cfg.trainer) or 1  # config validation: a number of devices
    if ranks > 1:
        check_client_devices(cfg)  # as at load and per site: DP-SGD, SCAFFOLD on one device
        from fl_lightning.client.ddp import RankData, client_ddp

        unused = cfg.trainer.strategy.lower().endswith("_find_unused_parameters_true")
        with client_ddp(ranks, find_unused_parameters=unused) as strategy:
            trainer = make_trainer(cfg.trainer, strategy=strategy, **kwargs)
            ready = time.perf_counter()  # the ranks' start counts as fit
            trainer.fit(model, datamodule=RankData(cfg, *split))
        return trainer, ready
    # `ddp` on one device (a site's override) would only add a process group.
    trainer = make_trainer(cfg.trainer, strategy="auto", **kwargs)
    val = data.val if cfg.trainer.limit_val_batches else None
    datamodule = client_datamodule(data.datamodule, loader, val)
    ready = time.perf_counter()
    with _hint_validation(cfg.trainer):
        trainer.fit(model, datamodule=datamodule)
    return trainer, ready


def _fitted(
    model: L.LightningModule,
    trainer: L.Trainer,
    num_train: int,
    dp: ClientDPSGD | None,
    seconds: dict[str, float],
    leave_out: set[str],
) -> ClientResult:
    """The reply of a fit: weights (not the personal layers, which never leave the client),
    the module's metrics (and epsilon), its timings."""
    metrics = logged_metrics(trainer.callback_metrics)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in leave_out}
    if dp is None:
        return ClientResult(state, metrics, num_train, seconds=seconds)
    metrics[EPSILON_METRIC] = dp.epsilon()
    return ClientResult(state, metrics, num_train, dp.state(), seconds)


@contextlib.contextmanager
def _hint_validation(cfg: TrainerConfig) -> Iterator[None]:
    """A scheduler or callback monitoring a metric nobody logged: say how to validate in fit."""
    try:
        yield
    except Exception as err:
        # Lightning's words for ReduceLROnPlateau, EarlyStopping and checkpoint monitors.
        if cfg.limit_val_batches or "which is not available" not in str(err):
            raise
        raise ClientError(
            f"{' '.join(str(err).split())}; clients validate inside fit only with "
            "trainer.limit_val_batches > 0 (e.g. 1.0)"
        ) from None


def _kept_state(
    cfg: Config,
    model: L.LightningModule,
    partition_id: int,
    server_round: int | None,
    scaffold: Scaffold | None = None,
    evaluating: bool = False,
) -> list[Callback]:
    """What keeps the client's state between rounds, if anything: its personal layers
    (`strategy.local_parameters`), then `ClientState`, which saves them with SCAFFOLD's c_i
    and the optimizers (`federation.stateful_clients`). Last but DP-SGD's callback.
    `evaluating`: an evaluate message of `server_round` (None: any), which reads only."""
    from fl_lightning.client.callbacks import PersonalLayers
    from fl_lightning.client.state import ClientState, client_state_dir

    patterns = cfg.strategy.local_parameters
    # An evaluate message needs only the personal layers: it reads no optimizer state.
    if not (patterns if evaluating else keeps_client_state(cfg)):
        return []
    kept: list[Callback] = []
    if patterns:
        kept.append(PersonalLayers(personal_keys(model.state_dict(), patterns)))
    folder = client_state_dir(cfg.output.dir, partition_id)
    own = [*kept, *([scaffold] if scaffold is not None else [])]
    optimizers = cfg.federation.stateful_clients
    return [*kept, ClientState(folder, server_round, own, optimizers, evaluating)]


def _federated_callbacks(
    cfg: Config, lr_factor: float, proximal_mu: float, scaffold: Scaffold | None
) -> list[Callback]:
    """The user's callbacks, then this round's: the server's lr factor, FedProx, SCAFFOLD,
    EMA."""
    callbacks = user_callbacks(cfg.trainer)
    if lr_factor != 1.0:
        callbacks.append(RoundLearningRate(lr_factor))
    if proximal_mu > 0:
        callbacks.append(FedProx(proximal_mu))
    if scaffold is not None:
        callbacks.append(scaffold)
    if cfg.optimizer.ema_decay is not None:
        # The average (buffers included) starts at the first step's weights; fit ends with it.
        callbacks.append(EMAWeightAveraging(decay=cfg.optimizer.ema_decay))
    return callbacks


def batchnorm_statistics(
    cfg: Config,
    state_dict: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
) -> ClientResult:
    """BatchNorm running statistics of the global weights, measured on the client's data.

    A forward pass in training mode, without gradients, over up to
    `strategy.batchnorm_batches` training batches (torch's `update_bn`, which calls the
    module on each batch's first element: a cumulative average over the batches). The
    reply holds only the BatchNorm running means and variances; `num_examples` counts the
    samples behind them.
    """
    seed = client_seed(cfg.seed, server_round, partition_id)
    with seeded(seed):  # augmentation, as in training; the process's RNGs are restored after
        data = client_data(cfg, partition_id, num_partitions, seed)
        model = _load(cfg, state_dict)
        device = _first_device(cfg.trainer)
        model.to(device)
        batches = list(itertools.islice(data.train, cfg.strategy.batchnorm_batches))
        update_bn(batches, model, device=device)
        keys = [k for k in state_dict if k.endswith(BATCHNORM_STATISTICS)]
        state = model.state_dict()
        statistics = {k: state[k].detach().cpu() for k in keys}
        return ClientResult(statistics, {}, num_examples=sum(_batch_size(b) for b in batches))


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return len(first)


def _first_device(cfg: TrainerConfig) -> torch.device:
    """The device evaluation runs on (see `one_device`), as a torch.device."""
    if cfg.accelerator in ("gpu", "cuda") or (
        cfg.accelerator == "auto" and torch.cuda.is_available()
    ):
        return torch.device("cuda", first_device_index(cfg) or 0)
    return torch.device("cpu")


def validate(
    cfg: Config,
    state_dict: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int | None = None,
) -> ClientResult:
    """Evaluate the global weights on the client's validation data (its module's metrics);
    with personal layers, the client's own as its rounds up to `server_round` left them."""
    data = client_data(cfg, partition_id, num_partitions, seed=cfg.seed)
    if data.val is None or data.num_val == 0:
        raise ClientError(
            f"client {partition_id} has no validation data; set data.val_fraction > 0, "
            "give the DataModule a val_dataloader, or federation.fraction_evaluate=0"
        )
    model = _load(cfg, state_dict)
    trainer = make_trainer(
        cfg.trainer,
        devices=one_device(cfg.trainer),
        strategy="auto",
        callbacks=[
            *user_callbacks(cfg.trainer),
            *_kept_state(cfg, model, partition_id, server_round, evaluating=True),
        ],
        limit_val_batches=1.0,  # all of it: the reply's num_examples counts every sample
    )
    datamodule = client_datamodule(data.datamodule, data.train, data.val)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    # callback_metrics, not validate()'s result: that names a value logged per step and
    # per epoch `name_epoch`, where training's metrics keep `name`.
    return ClientResult(None, logged_metrics(trainer.callback_metrics), data.num_val)


def census(
    cfg: Config, partition_id: int, num_partitions: int, with_labels: bool
) -> tuple[int, int, list[int] | None]:
    """What the client tells the server's census: its train and validation sizes and, if
    `with_labels` and it can count them cheaply, its training-label counts."""
    if not 0 <= partition_id < num_partitions:
        raise ClientError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; check the "
            "node config's partition-id and num-partitions"
        )
    data: ClientData = client_data(cfg, partition_id, num_partitions, seed=cfg.seed)
    if not with_labels or data.train_labels is None or cfg.data.class_path is not None:
        return data.num_train, data.num_val, None
    from fl_lightning.data.datasets import load_splits

    counts = torch.bincount(data.train_labels, minlength=load_splits(cfg.data).num_classes)
    return data.num_train, data.num_val, [int(c) for c in counts]
