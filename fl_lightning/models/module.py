"""The LightningModule every model shares: steps, torchmetrics, optimizer."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(L.LightningModule):
    """Cross-entropy image classifier; subclasses define `build_network`.

    Logs `<stage>/loss` and `<stage>/accuracy` per epoch for stage in train, val, test:
    the metric names the Flower apps, TensorBoard and metrics.jsonl use too.
    """

    # The (C, H, W) input the architecture is fixed to; None: any, sized by init args.
    input_shape: ClassVar[tuple[int, int, int] | None] = None

    def __init__(
        self,
        num_classes: int = 10,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "none",
        label_smoothing: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = self.build_network()

    def _stage_metrics(self, stage: str) -> MetricCollection:
        """The stage's metrics, named as logged, built at the stage's first step.

        One collection per stage: torchmetrics states must not mix stages. Built on first
        use because a client's Trainer runs one stage per message, and each collection
        costs about 1.5 ms to build. Steps only update them; each epoch's end logs them once
        (see _log_epoch): `self.log` per step cost Lightning 1-2 ms of bookkeeping
        (profiled), 10-25% of a small model's CPU step.
        """
        name = f"{stage}_metrics"
        if name not in self._modules:
            metrics = MetricCollection(
                {
                    "loss": MeanMetric(),
                    "accuracy": MulticlassAccuracy(self.hparams["num_classes"], average="micro"),
                },
                prefix=f"{stage}/",
            )
            self.add_module(name, metrics.to(self.device))
        return cast(MetricCollection, self._modules[name])

    def build_network(self) -> nn.Module:
        """The architecture, mapping (B, C, H, W) images to (B, num_classes) logits."""
        raise NotImplementedError

    def activation(self) -> nn.Module:
        """A new hidden activation: ReLU, or tanh (the tempered sigmoid that suits DP-SGD)."""
        return nn.Tanh() if self.hparams["activation"] == "tanh" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of normalised images."""
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        # Label smoothing regularises training only; val/test report the plain cross-entropy.
        smoothing = self.hparams["label_smoothing"] if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        metrics = self._stage_metrics(stage)
        metrics["loss"].update(loss.detach(), weight=len(labels))
        metrics["accuracy"].update(logits.detach(), labels)
        return loss

    def _log_epoch(self, stage: str) -> None:
        # Logging the Metric objects lets Lightning compute, sync (DDP) and reset them.
        self.log_dict(self._stage_metrics(stage), on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's train/loss and train/accuracy."""
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        """Log val/loss and val/accuracy over the whole validation set."""
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        """Log test/loss and test/accuracy over the whole test set."""
        self._log_epoch("test")

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

    def configure_optimizers(self) -> Any:
        """The optimizer named in the hyperparameters, with a per-step cosine decay if asked."""
        hp: Any = self.hparams  # AttributeDict of the __init__ arguments
        optimizer: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            optimizer_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        # Cosine to zero over this fit's steps: in FL, over one round of local training.
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
