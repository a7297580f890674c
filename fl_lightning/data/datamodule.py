"""The LightningDataModule that serves one client's samples (or the server's test split)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from fl_lightning import seeding
from fl_lightning.config.schema import DataConfig
from fl_lightning.data.datasets import (
    Corruption,
    DatasetSplits,
    IndexedImages,
    collate_batch,
    load_splits,
)
from fl_lightning.data.partition import client_splits, subsample
from fl_lightning.errors import ConfigError
from fl_lightning.seeding import derive


class FederatedDataModule(L.LightningDataModule):
    """Dataloaders of one client (`partition_id` of `num_partitions`), or of the server.

    Train/val come from the client's partition of the train split (noisy if the client is
    listed in `data.noise.clients`); the server (`partition_id=None`) holds no training
    samples. Test is the whole (optionally capped) test split. `shuffle_seed` fixes the
    order of training batches.
    """

    def __init__(
        self,
        data: DataConfig,
        seed: int,
        partition_id: int | None = None,
        num_partitions: int = 1,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self.data = data
        self.seed = seed
        self.shuffle_seed = shuffle_seed
        self.splits: DatasetSplits = load_splits(data)  # cached per process, not per client
        self.test_indices = subsample(len(self.splits.test), data.max_test_samples, seed)
        self.noisy = partition_id in data.noise.clients
        if partition_id is None:  # the server: no partitioning work for it
            self.train_indices = self.val_indices = torch.empty(0, dtype=torch.long)
            return
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"partition-id {partition_id} is outside 0..{num_partitions - 1}; check the "
                "node config's partition-id and num-partitions"
            )
        self.train_indices, self.val_indices = client_splits(data, num_partitions, seed)[
            partition_id
        ]

    def corruption(self, split: str) -> Corruption:
        """The noise of `data.noise`, seeded differently for the train and test splits."""
        noise = self.data.noise
        return Corruption(
            std=noise.std,
            label_fraction=noise.label_fraction if split == "train" else 0.0,
            num_classes=self.splits.num_classes,
            seed=derive(self.seed, "noise", split),
        )

    def _loader(
        self,
        split: str,
        indices: torch.Tensor,
        noisy: bool,
        training: bool = False,
    ) -> DataLoader:
        """Batches of `indices` into `split`; training ones shuffled, augmented, smaller."""
        dataset = IndexedImages(
            getattr(self.splits, split),
            indices,
            self.splits.mean,
            self.splits.std,
            noise=self.corruption(split) if noisy else None,
            augment=self.data.augment if training else "none",
        )
        generator = seeding.generator(self.shuffle_seed, "shuffle") if training else None
        # num_workers=0: batches are tensor slices already in memory; workers only add IPC.
        return DataLoader(
            dataset,
            # Training batches are the optimisation's; evaluation ones only need to be fast.
            batch_size=self.data.batch_size if training else self.data.eval_batch_size,
            shuffle=training,
            generator=generator,
            collate_fn=collate_batch,
            num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (and, with data.augment, augmented) batches of the client's partition."""
        return self._loader("train", self.train_indices, self.noisy, training=True)

    def val_dataloader(self) -> DataLoader:
        """The client's held-out validation samples."""
        return self._loader("train", self.val_indices, self.noisy)

    def test_dataloader(self) -> DataLoader:
        """The full (or capped) clean test split, for the server's centralized evaluation."""
        return self._loader("test", self.test_indices, noisy=False)

    def noisy_test_dataloader(self) -> DataLoader:
        """The test split with `data.noise` applied: what a noisy client's data looks like."""
        return self._loader("test", self.test_indices, noisy=True)


class ImageDataModule(FederatedDataModule):
    """The built-in datasets as a DataModule named by `data.class_path` (contract a).

    `fl_lightning.data.datamodule.ImageDataModule` with init_args `{dataset: mnist, root: ...}`
    (any built-in `data.*` key, plus `seed`) serves exactly what `data.dataset: mnist`
    does: it is the same DataModule, built from arguments instead of a config section.
    Training batches are shuffled with `shuffle_seed`, which fl-lightning passes per
    client and round (as for the built-in data).
    """

    def __init__(
        self,
        partition_id: int | None = None,
        num_partitions: int = 1,
        seed: int = 42,
        shuffle_seed: int = 0,
        **data: Any,
    ) -> None:
        from fl_lightning.config.load import data_config

        config = data_config(data, "data.init_args.")
        super().__init__(config, seed, partition_id, num_partitions, shuffle_seed=shuffle_seed)
