"""What one client trains and validates on, and what the server tests on: the data contract.

The built-in datasets (`data.dataset`) are served by `FederatedDataModule`. Any other
LightningDataModule is named by `data.class_path` / `data.init_args` and federated under
one of two contracts, chosen by its constructor's signature:

(a) It takes `partition_id` and `num_partitions` (Flower's `load_data(partition_id,
    num_partitions)` convention): each client builds it with its own partition and uses its
    `train_dataloader` and, if it defines one, its `val_dataloader`. On a deployed
    SuperNode this is how a site reads its own local data (its node config sets the
    DataModule's init_args). The server builds it with `partition_id=None` and evaluates
    on its `test_dataloader`.
(b) It does not: fl-lightning cuts the dataset of its `train_dataloader` into
    `federation.num_clients` partitions (`data.partition`: iid, dirichlet or shards, with
    labels read from the dataset's `targets` or from its samples), holds out
    `data.val_fraction` of each for validation, and batches them as the DataModule's own
    loader does. The server evaluates on its `test_dataloader`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fl_lightning import seeding
from fl_lightning.config.class_path import ClassSpec, instantiate
from fl_lightning.config.schema import PARTITION_ARGS, Config, DataConfig
from fl_lightning.errors import ClientError, ConfigError


@dataclass
class ClientData:
    """One client's loaders and sizes (the census reports the sizes)."""

    train: DataLoader
    val: DataLoader | None
    num_train: int
    num_val: int
    # Training labels of the client, where they can be read without decoding samples.
    train_labels: torch.Tensor | None = None
    # The DataModule behind the loaders, set up for "fit": what `trainer.datamodule` shows.
    datamodule: pl.LightningDataModule | None = None


def spec(data: DataConfig) -> ClassSpec:
    """The DataModule that `data.class_path` names."""
    assert data.class_path is not None
    return ClassSpec(data.class_path, dict(data.init_args))


def knows_partitions(data: DataConfig) -> bool:
    """Whether the DataModule loads a client's share itself (contract a)."""
    return set(PARTITION_ARGS) <= _parameters(data)


def _parameters(data: DataConfig) -> set[str]:
    """The names the DataModule's `__init__` takes."""
    from fl_lightning.config.class_path import import_class

    cls = import_class(spec(data).class_path, "data.class_path", pl.LightningDataModule)
    return set(inspect.signature(cls).parameters)


def defines(datamodule: pl.LightningDataModule | type, hook: str) -> bool:
    """Whether the DataModule (or its class) overrides `hook` (e.g. `val_dataloader`)."""
    cls = datamodule if isinstance(datamodule, type) else type(datamodule)
    return getattr(cls, hook) is not getattr(pl.LightningDataModule, hook)


def has_validation(cfg: Config) -> bool:
    """Whether clients hold validation data (else the run has no federated evaluation)."""
    d = cfg.data
    if d.class_path is None or not knows_partitions(d):
        return d.val_fraction > 0
    from fl_lightning.config.class_path import import_class

    return defines(import_class(d.class_path, "data.class_path"), "val_dataloader")


def check_fit_validation(cfg: Config) -> None:
    """A ConfigError if clients are to validate inside fit (`trainer.limit_val_batches`) and
    hold no validation data."""
    if cfg.trainer.limit_val_batches and not has_validation(cfg):
        raise ConfigError(
            "trainer.limit_val_batches: clients validate inside fit on their held-out data, "
            "and they hold none; set data.val_fraction > 0 (or give the DataModule a "
            "val_dataloader), or trainer.limit_val_batches=0"
        )


def _built(
    data: DataConfig, stage: str, prepare: bool = False, **given: Any
) -> pl.LightningDataModule:
    """The DataModule set up for `stage`; `prepare_data` (downloads) only where `prepare`.

    It runs once, where the run starts (the server's test data is built there first), not
    in every client process of every round, which would race on a shared folder.
    """
    datamodule = instantiate(spec(data), "data", pl.LightningDataModule, **given)
    if prepare:
        _call(datamodule, "prepare_data")
    _call(datamodule, "setup", stage)
    return datamodule


def _call(datamodule: pl.LightningDataModule, hook: str, *args: Any) -> Any:
    """The DataModule's `hook`, an exception it raises said in one line naming it."""
    try:
        return getattr(datamodule, hook)(*args)
    except ConfigError:
        raise
    except Exception as err:
        shown = ", ".join(map(repr, args))
        raise ConfigError(
            f"data.class_path: {type(datamodule).__name__}.{hook}({shown}) raised "
            f"{type(err).__name__}: {err}"
        ) from None


def client_data(cfg: Config, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    """The loaders of client `partition_id` (training shuffled with `seed`)."""
    if cfg.data.class_path is None:
        return _builtin(cfg, partition_id, num_partitions, seed)
    if knows_partitions(cfg.data):
        given: dict[str, Any] = {"partition_id": partition_id, "num_partitions": num_partitions}
        if "shuffle_seed" in _parameters(cfg.data):  # ImageDataModule: the round's shuffle
            given["shuffle_seed"] = seed
        datamodule = _built(cfg.data, "fit", **given)
        train = _call(datamodule, "train_dataloader")
        val = _call(datamodule, "val_dataloader") if defines(datamodule, "val_dataloader") else None
        return ClientData(
            train, val, _size(train, "train"), _size(val, "val"), datamodule=datamodule
        )
    plain = _plain(cfg.data, num_partitions, cfg.seed)
    indices_train, indices_val = plain.splits[partition_id]
    train = _rebatched(plain.loader, Subset(plain.dataset, indices_train.tolist()), seed)
    val = (
        _rebatched(plain.loader, Subset(plain.dataset, indices_val.tolist()), None)
        if len(indices_val)
        else None
    )
    labels = plain.labels[indices_train] if plain.labels is not None else None
    return ClientData(train, val, len(indices_train), len(indices_val), labels, plain.datamodule)


def central_test_loader(cfg: Config) -> DataLoader:
    """The server's test data: the DataModule's `test_dataloader` (contract a: partition None)."""
    given = {"partition_id": None, "num_partitions": cfg.federation.num_clients}
    partitions = given if knows_partitions(cfg.data) else {}
    datamodule = _built(cfg.data, "test", prepare=True, **partitions)
    if not defines(datamodule, "test_dataloader"):
        raise ConfigError(
            f"data.class_path: {type(datamodule).__name__} defines no test_dataloader, and the "
            "server evaluates the global model on it every round; add one"
        )
    loader = _call(datamodule, "test_dataloader")
    if _size(loader, "test") == 0:  # _size refuses anything but one sized DataLoader
        raise ConfigError(
            f"data.class_path: {type(datamodule).__name__}.test_dataloader() yields no test "
            "samples (one DataLoader over a non-empty dataset is needed)"
        )
    return loader


def test_subset(loader: DataLoader, max_samples: int | None, seed: int) -> DataLoader:
    """`loader` over a seeded subset of `max_samples` of its samples (`evaluation.max_samples`),
    in their order; `loader` itself when it holds no more."""
    size = _size(loader, "test")
    if max_samples is None or size <= max_samples:
        return loader
    chosen = torch.randperm(size, generator=seeding.generator(seed, "evaluation-subset"))
    indices = chosen[:max_samples].sort().values.tolist()
    return _rebatched(loader, Subset(loader.dataset, indices), None, "test")


def _builtin(cfg: Config, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    from fl_lightning.data.datamodule import FederatedDataModule

    # Shuffled with the round's seed, which fit has set as torch's (as for ImageDataModule).
    dm = FederatedDataModule(cfg.data, cfg.seed, partition_id, num_partitions, shuffle_seed=seed)
    val = dm.val_dataloader() if len(dm.val_indices) else None
    labels = dm.splits.train.labels[dm.train_indices]
    return ClientData(
        dm.train_dataloader(), val, len(dm.train_indices), len(dm.val_indices), labels, dm
    )


def _size(loader: DataLoader | None, what: str) -> int:
    if loader is None:
        return 0
    if not isinstance(loader, DataLoader) or not isinstance(loader.dataset, Sized):
        raise ConfigError(
            f"data.class_path: the {what} dataloader must be one torch DataLoader over a "
            "dataset with a length (fl-lightning weighs clients by their sample counts)"
        )
    return len(loader.dataset)


@dataclass(frozen=True)
class _Plain:
    """A contract-(b) DataModule's training data, cut into every client's (train, val)."""

    loader: DataLoader
    dataset: Dataset
    labels: torch.Tensor | None
    splits: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    datamodule: pl.LightningDataModule


@functools.lru_cache(maxsize=2)
def _plain(data: DataConfig, num_partitions: int, seed: int) -> _Plain:
    """Cached per process: a Ray worker serving many clients sets the DataModule up and
    reads its labels once."""
    from fl_lightning.data.partition import cut

    datamodule = _built(data, "fit")
    loader = _call(datamodule, "train_dataloader")
    size = _size(loader, "train")
    by_label = data.partition in ("dirichlet", "shards")
    labels = _labels(loader.dataset, size) if by_label else None
    positions = labels if labels is not None else torch.zeros(size, dtype=torch.long)
    splits = cut(positions, data, num_partitions, seed)
    return _Plain(loader, loader.dataset, labels, splits, datamodule)


def _labels(dataset: Dataset, size: int) -> torch.Tensor:
    """Every sample's integer label: `dataset.targets` if it has them, else each sample's [1]."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == size:
        return torch.as_tensor(targets, dtype=torch.long)
    try:
        return torch.tensor([int(dataset[i][1]) for i in range(size)], dtype=torch.long)
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise ConfigError(
            "data.partition: dirichlet and shards need each training sample's class label, "
            f"and the dataset has no `targets` and its samples are not (input, label) ({err}); "
            "use data.partition=iid or give the dataset a `targets` list"
        ) from None


def _rebatched(
    loader: DataLoader, subset: Subset, seed: int | None, what: str = "train"
) -> DataLoader:
    """A loader over `subset` batched like `loader` (shuffled with `seed` if given)."""
    generator = seeding.generator(seed, "shuffle") if seed is not None else None
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if batch_size is None:
        raise ClientError(
            f"data.class_path: the {what}_dataloader has no batch_size (a custom "
            "batch_sampler?); fl-lightning re-batches a share of its samples with it: pass "
            "batch_size, or load one client's share yourself (take partition_id)"
        )
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=seed is not None,
        generator=generator,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers if loader.num_workers else False,
    )
