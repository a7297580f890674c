"""The server's view of the global model: centralized evaluation on the test split, checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from fl_lightning.config import Config
from fl_lightning.datamodule import FederatedDataModule
from fl_lightning.models import build_model
from fl_lightning.module import ImageClassifier
from fl_lightning.rundir import write_atomically
from fl_lightning.training import make_trainer, one_device, quiet_lightning


class CentralEvaluator:
    """Holds the server-side LightningModule and Trainer, built once and reused every round."""

    def __init__(self, cfg: Config) -> None:
        quiet_lightning()
        self.datamodule = FederatedDataModule(cfg.data, cfg.seed)
        self.model: ImageClassifier = build_model(cfg, self.datamodule.splits.num_classes)
        # Evaluation needs one device; DDP would shard (and pad) the test set.
        self.trainer = make_trainer(cfg.trainer, devices=one_device(cfg.trainer), strategy="auto")
        self.loader = self.datamodule.test_dataloader()
        self.noisy_loader = self.datamodule.noisy_test_dataloader()

    def evaluate(
        self, state_dict: dict[str, torch.Tensor], noisy: bool = False
    ) -> dict[str, float]:
        """Load `state_dict` and return `centralized/loss` and `centralized/accuracy`.

        `noisy=True` evaluates on the test split with `data.noise` applied instead.
        """
        self.model.load_state_dict(state_dict)
        loader = self.noisy_loader if noisy else self.loader
        (metrics,) = self.trainer.test(self.model, dataloaders=loader, verbose=False)
        # The server's test split is what "centralized" means in every log and table.
        return {k.replace("test/", "centralized/", 1): float(v) for k, v in metrics.items()}

    def save_checkpoint(self, path: Path) -> None:
        """Write a Lightning checkpoint of the last evaluated weights, atomically and durably."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(
            path, lambda partial: self.trainer.save_checkpoint(partial, weights_only=True)
        )
