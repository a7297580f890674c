"""Seeded client partitions of a dataset, kept as index tensors (never copies of the data).

Imports torch but not Lightning: the CLI checks data and partitions with it before Ray starts.
"""

from __future__ import annotations

import functools
import warnings

import torch

from fl_lightning.config.schema import DataConfig
from fl_lightning.data.datasets import load_splits
from fl_lightning.errors import ConfigError
from fl_lightning.seeding import generator


def subsample(num_samples: int, cap: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded random subset of at most `cap` samples (all, in order, if None)."""
    if cap is None or cap >= num_samples:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=generator(seed, "subsample"))[:cap].sort().values


def iid_partitions(indices: torch.Tensor, num_partitions: int, seed: int) -> list[torch.Tensor]:
    """Split `indices` into `num_partitions` disjoint, covering, seeded parts (sizes +-1)."""
    if num_partitions > len(indices):
        raise ConfigError(
            f"federation.num_clients: {num_partitions} clients but only {len(indices)} training "
            "samples; lower num_clients or raise data.max_train_samples"
        )
    shuffled = indices[torch.randperm(len(indices), generator=generator(seed, "partition"))]
    return list(torch.tensor_split(shuffled, num_partitions))


def train_val_split(
    indices: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out a seeded `val_fraction` of a client's partition for local validation."""
    num_val = round(len(indices) * val_fraction)
    shuffled = indices[torch.randperm(len(indices), generator=generator(seed, "validation"))]
    return shuffled[num_val:], shuffled[:num_val]


def label_partitions(
    labels: torch.Tensor,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[torch.Tensor]:
    """Positions into `labels` for each partition: `iid`, `dirichlet` (alpha) or `shards`.

    The non-IID schemes are flwr-datasets' DirichletPartitioner and ShardPartitioner
    (McMahan et al.'s label-sorted shards), run on an in-memory table of the labels.
    """
    if scheme == "iid":
        return iid_partitions(torch.arange(len(labels)), num_partitions, seed)
    if scheme == "site":  # every client holds its own data: all of it is its partition
        return [torch.arange(len(labels))] * num_partitions
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, Partitioner, ShardPartitioner

    table = Dataset.from_dict({"label": labels.numpy(), "position": list(range(len(labels)))})
    partitioner: Partitioner
    if scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha, min_partition_size=2, seed=seed
        )
    else:
        shard_size = len(labels) // (num_partitions * shards_per_client)
        if shard_size == 0:
            raise ConfigError(
                f"data.shards_per_client: {num_partitions} clients x {shards_per_client} shards "
                f"is more shards than the {len(labels)} training samples"
            )
        partitioner = ShardPartitioner(
            num_partitions,
            partition_by="label",
            num_shards_per_partition=shards_per_client,
            shard_size=shard_size,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # pyarrow deprecations inside flwr-datasets' sorting
            warnings.simplefilter("ignore", FutureWarning)
            parts = [partitioner.load_partition(i)["position"] for i in range(num_partitions)]
    except ValueError as err:  # e.g. no Dirichlet draw gives every client enough samples
        raise ConfigError(f"data.partition={scheme}: {err}") from None
    return [torch.as_tensor(part, dtype=torch.long) for part in parts]


ClientSplit = tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=4)
def client_splits(data: DataConfig, num_partitions: int, seed: int) -> tuple[ClientSplit, ...]:
    """(train, val) indices into the train split for every client, computed once per process."""
    splits = load_splits(data)
    pool = subsample(len(splits.train), data.max_train_samples, seed)
    return cut(splits.train.labels[pool], data, num_partitions, seed, pool)


def cut(
    labels: torch.Tensor,
    data: DataConfig,
    num_partitions: int,
    seed: int,
    pool: torch.Tensor | None = None,
) -> tuple[ClientSplit, ...]:
    """Every client's (train, val): `data.partition`'s parts of `labels`, each with its
    held-out `data.val_fraction`, as positions into `pool` (or into `labels`)."""
    parts = label_partitions(
        labels,
        num_partitions,
        data.partition,
        seed,
        alpha=data.alpha,
        shards_per_client=data.shards_per_client,
    )
    result = []
    for partition_id, part in enumerate(parts):
        train, val = train_val_split(part if pool is None else pool[part], data.val_fraction, seed)
        if len(train) == 0:
            raise ConfigError(
                f"federation.num_clients: client {partition_id} has no training samples; "
                "lower num_clients or data.val_fraction, or raise data.max_train_samples"
            )
        result.append((train, val))
    return tuple(result)


def label_counts(data: DataConfig, num_partitions: int, seed: int) -> torch.Tensor:
    """(clients, classes) counts of each client's training labels."""
    splits = load_splits(data)
    return torch.stack(
        [
            torch.bincount(splits.train.labels[train], minlength=splits.num_classes)
            for train, _ in client_splits(data, num_partitions, seed)
        ]
    )
