"""LightningDataModule over a client's partition (train/val) and the full test split."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from fl_lightning.config import DataConfig
from fl_lightning.data import DatasetSplits, IndexedImages, collate_batch, load_splits
from fl_lightning.partition import client_indices, subsample


class FederatedDataModule(L.LightningDataModule):
    """Dataloaders of one client (`partition_id` of `num_partitions`), or of the server.

    Train/val come from the client's IID partition of the train split, test is the whole
    (optionally capped) test split. `shuffle_seed` fixes the order of training batches.
    """

    def __init__(
        self,
        data: DataConfig,
        seed: int,
        partition_id: int = 0,
        num_partitions: int = 1,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        self.data = data
        self.seed = seed
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.shuffle_seed = shuffle_seed
        self.splits: DatasetSplits = load_splits(data)  # cached per process, not per client
        self.train_indices, self.val_indices = client_indices(
            num_train=len(self.splits.train),
            partition_id=partition_id,
            num_partitions=num_partitions,
            val_fraction=data.val_fraction,
            max_train_samples=data.max_train_samples,
            seed=seed,
        )
        self.test_indices = subsample(len(self.splits.test), data.max_test_samples, seed)

    def _loader(self, split: str, indices: torch.Tensor, shuffle: bool) -> DataLoader:
        tensors = getattr(self.splits, split)
        dataset = IndexedImages(tensors, indices, self.splits.mean, self.splits.std)
        generator = torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None
        # num_workers=0: batches are tensor slices already in memory; workers only add IPC.
        return DataLoader(
            dataset,
            batch_size=self.data.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate_batch,
            num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the client's training partition."""
        return self._loader("train", self.train_indices, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The client's held-out validation samples."""
        return self._loader("train", self.val_indices, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The full (or capped) test split, for the server's centralized evaluation."""
        return self._loader("test", self.test_indices, shuffle=False)
