"""The server's view of the global model: centralized evaluation on the test data, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from fl_lightning.config import Config
from fl_lightning.models import build_model
from fl_lightning.rundir import write_atomically
from fl_lightning.training import logged_metrics, make_trainer, one_device, quiet_lightning


class CentralEvaluator:
    """Holds the server-side LightningModule, Trainer and test data, built once for the run.

    The test data is the built-in dataset's test split or the DataModule's
    `test_dataloader` (`fl_lightning.client_data.central_test_loader`); the server never opens
    a client's training data.
    """

    def __init__(self, cfg: Config) -> None:
        quiet_lightning()
        self.cfg = cfg
        self.model: L.LightningModule = build_model(cfg)
        # Evaluation needs one device; DDP would shard (and pad) the test set.
        self.trainer = make_trainer(cfg.trainer, devices=one_device(cfg.trainer), strategy="auto")
        self.loader, self.noisy_loader = _test_loaders(cfg)

    def evaluate(
        self, state_dict: dict[str, torch.Tensor], noisy: bool = False
    ) -> dict[str, float]:
        """Load `state_dict` and return what the module's `test_step` logs (`test/accuracy`...).

        `noisy=True` evaluates on the test split with `data.noise` applied instead.
        """
        self.model.load_state_dict(state_dict)
        loader = self.noisy_loader if noisy else self.loader
        (metrics,) = self.trainer.test(self.model, dataloaders=loader, verbose=False)
        return logged_metrics(metrics)

    def save_checkpoint(self, path: Path) -> None:
        """Write a Lightning checkpoint of the last evaluated weights, atomically and durably."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(
            path, lambda partial: self.trainer.save_checkpoint(partial, weights_only=True)
        )


def _test_loaders(cfg: Config) -> tuple[DataLoader, DataLoader]:
    """The clean test loader and the one with `data.noise` (built-in datasets only)."""
    if cfg.data.class_path is not None:
        from fl_lightning.client_data import central_test_loader

        loader = central_test_loader(cfg)
        return loader, loader
    from fl_lightning.datamodule import FederatedDataModule

    datamodule = FederatedDataModule(cfg.data, cfg.seed)
    return datamodule.test_dataloader(), datamodule.noisy_test_dataloader()
