"""Seeded client partitions of a dataset, kept as index tensors (never copies of the data)."""

from __future__ import annotations

import torch

from fl_lightning.errors import ConfigError


def _generator(*seeds: int) -> torch.Generator:
    """A private RNG from several integers, so no code touches torch's global RNG here."""
    seed = 0
    for value in seeds:
        seed = (seed * 1_000_003 + value) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def subsample(num_samples: int, cap: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded random subset of at most `cap` samples (all, in order, if None)."""
    if cap is None or cap >= num_samples:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=_generator(seed, 1))[:cap].sort().values


def iid_partitions(indices: torch.Tensor, num_partitions: int, seed: int) -> list[torch.Tensor]:
    """Split `indices` into `num_partitions` disjoint, covering, seeded parts (sizes +-1)."""
    if num_partitions > len(indices):
        raise ConfigError(
            f"federation.num_clients: {num_partitions} clients but only {len(indices)} training "
            "samples; lower num_clients or raise data.max_train_samples"
        )
    shuffled = indices[torch.randperm(len(indices), generator=_generator(seed, 2))]
    return list(torch.tensor_split(shuffled, num_partitions))


def train_val_split(
    indices: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out a seeded `val_fraction` of a client's partition for local validation."""
    num_val = round(len(indices) * val_fraction)
    shuffled = indices[torch.randperm(len(indices), generator=_generator(seed, 3))]
    return shuffled[num_val:], shuffled[:num_val]


def client_indices(
    num_train: int,
    partition_id: int,
    num_partitions: int,
    val_fraction: float,
    max_train_samples: int | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into the train split for client `partition_id` of `num_partitions`."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}; check the "
            "node config's partition-id and num-partitions"
        )
    pool = subsample(num_train, max_train_samples, seed)
    part = iid_partitions(pool, num_partitions, seed)[partition_id]
    train, val = train_val_split(part, val_fraction, seed)
    if len(train) == 0:
        raise ConfigError(
            f"federation.num_clients: client {partition_id} has no training samples left; "
            "lower num_clients or data.val_fraction"
        )
    return train, val
