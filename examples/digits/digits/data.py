"""The data: torchvision's MNIST, as a plain LightningDataModule.

fl-lightning cuts the training set into one share per client (`data.partition` in
config.yaml) and holds `data.val_fraction` of each share out for the client's validation;
the server tests the global model on `test_dataloader` after every round.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms


class MNISTDigits(pl.LightningDataModule):
    """MNIST's 60,000 training and 10,000 test digits, or only the first few of each."""

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        download: bool = True,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.download = download
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        )

    def prepare_data(self) -> None:
        """Download MNIST into `root` if it is not there yet (and `download` allows it)."""
        if self.download:  # torchvision skips the download when the files are there
            datasets.MNIST(self.root, train=True, download=True)
            datasets.MNIST(self.root, train=False, download=True)

    def setup(self, stage: str) -> None:
        """Load the training set for `fit`, the test set for `test`."""
        if stage == "fit":
            self.train_set = self._mnist(train=True, limit=self.max_train_samples)
        if stage == "test":
            self.test_set = self._mnist(train=False, limit=self.max_test_samples)

    def _mnist(self, train: bool, limit: int | None) -> Dataset:
        dataset = datasets.MNIST(self.root, train=train, transform=self.transform)
        return dataset if limit is None else Subset(dataset, range(min(limit, len(dataset))))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (fl-lightning batches each client's share the same way)."""
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        """The test set, in larger batches: evaluation keeps no gradients."""
        return DataLoader(self.test_set, batch_size=128)
