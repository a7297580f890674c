"""The model: a small MLP classifying MNIST digits, as a plain LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

Batch = tuple[torch.Tensor, torch.Tensor]  # (images, labels)


class LitDigits(pl.LightningModule):
    """A two-layer MLP over the 28x28 pixels, trained with SGD and momentum."""

    def __init__(self, hidden: int = 128, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()  # so that LitDigits.load_from_checkpoint rebuilds it
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        # One metric object per stage: each accumulates its own stage's batches.
        self.val_accuracy = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images."""
        return self.net(x)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The batch's cross-entropy, logged as the epoch's mean `train/loss`."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Log `val/loss` and `val/accuracy`."""
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Log `test/loss` and `test/accuracy`."""
        self._evaluate(batch, "test", self.test_accuracy)

    def _evaluate(self, batch: Batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y))
        self.log(f"{stage}/accuracy", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum at the `lr` the module was built with."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
