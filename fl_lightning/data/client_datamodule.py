"""What a client's Trainer sees as `trainer.datamodule`: its loaders, the DataModule behind.

Lightning gives callbacks and modules the DataModule a fit or validate ran with
(`trainer.datamodule`), and calls its batch-transfer hooks. A client trains on its
partition's loaders (or Opacus's Poisson-sampled one), not on what the DataModule's own
`train_dataloader` returns, so the Trainer gets this wrapper: its loaders are the client's,
and every other attribute and hook is the DataModule's, already set up for the stage.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader


class ClientDataModule(pl.LightningDataModule):
    """The client's training loader, and the user's (or built-in) DataModule's attributes."""

    def __init__(self, datamodule: pl.LightningDataModule | None, train: DataLoader) -> None:
        super().__init__()
        self.datamodule = datamodule
        self._train = train

    def __getattr__(self, name: str) -> Any:
        """The wrapped DataModule's attribute (e.g. a dataset its `setup` made)."""
        # Called only for names the wrapper lacks; dunders (copy, pickle) stay its own.
        inner = self.__dict__.get("datamodule")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(inner, name)

    def train_dataloader(self) -> DataLoader:
        """The client's training batches."""
        return self._train

    # Set up where the client built it (`fl_lightning.data.loaders`); never twice.
    def prepare_data(self) -> None:
        """Nothing: the run prepares the data once, where it starts."""

    def setup(self, stage: str) -> None:
        """Nothing: the wrapped DataModule was set up for this client already."""

    def teardown(self, stage: str) -> None:
        """The wrapped DataModule's teardown."""
        if self.datamodule is not None:
            self.datamodule.teardown(stage)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """The wrapped DataModule's hook (Lightning's default without one)."""
        if self.datamodule is None:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The wrapped DataModule's hook."""
        if self.datamodule is None:
            return batch
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The wrapped DataModule's hook."""
        if self.datamodule is None:
            return batch
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)


class ValidatingClientDataModule(ClientDataModule):
    """A `ClientDataModule` with the client's validation loader too (Lightning validates
    with a DataModule only where it defines `val_dataloader`)."""

    def __init__(
        self, datamodule: pl.LightningDataModule | None, train: DataLoader, val: DataLoader
    ) -> None:
        super().__init__(datamodule, train)
        self._val = val

    def val_dataloader(self) -> DataLoader:
        """The client's held-out batches."""
        return self._val


def client_datamodule(
    datamodule: pl.LightningDataModule | None, train: DataLoader, val: DataLoader | None
) -> ClientDataModule:
    """The DataModule a client's Trainer runs with: `val` given, it validates on it."""
    if val is None:
        return ClientDataModule(datamodule, train)
    return ValidatingClientDataModule(datamodule, train, val)
