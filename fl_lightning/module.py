"""The LightningModule every model shares: steps, torchmetrics, optimizer."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """Cross-entropy image classifier; subclasses define `build_network`.

    Logs `<stage>/loss` and `<stage>/accuracy` per epoch for stage in train, val, test:
    the metric names the Flower apps, TensorBoard and metrics.jsonl use too.
    """

    def __init__(
        self,
        num_classes: int = 10,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = self.build_network()
        # One metric object per stage: torchmetrics states must not mix stages.
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def build_network(self) -> nn.Module:
        """The architecture, mapping (B, C, H, W) images to (B, num_classes) logits."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of normalised images."""
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = getattr(self, f"{stage}_accuracy")
        accuracy(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        self.log(f"{stage}/accuracy", accuracy, on_step=False, on_epoch=True)
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """One optimisation step's loss."""
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Accumulate validation loss and accuracy."""
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Accumulate test loss and accuracy."""
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer named in the hyperparameters."""
        hp: Any = self.hparams  # AttributeDict of the __init__ arguments
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        optimizer_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        return optimizer_cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
