"""Lightning callbacks that add a federated algorithm's piece to any LightningModule's training.

They change the Trainer's optimisation from outside the module, so a user's module is
federated unchanged: FedProx's proximal term and the server's learning-rate schedule
across rounds. (DP-SGD's private optimizer is `fl_lightning.privacy.dp_sgd.PrivateOptimizer`.)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class FedProx(Callback):
    """FedProx (Li et al., 2020): the gradient of (mu/2)||w - w_global||^2 added to every step.

    `w_global` is the module's weights when `fit` starts (the round's global model). The
    term is added to the gradients just before each optimizer step (after AMP unscaling,
    before Lightning's gradient clipping), which is what adding it to the loss gives.
    """

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.anchor: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep a copy of the global model's trainable weights."""
        self.anchor = [(p, p.detach().clone()) for p in pl_module.parameters() if p.requires_grad]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add mu * (w - w_global) to each gradient."""
        with torch.no_grad():
            for parameter, start in self.anchor:
                if parameter.grad is not None:
                    parameter.grad.add_(parameter - start, alpha=self.mu)


class RoundLearningRate(Callback):
    """Scales every learning rate of the module's optimizers (and their schedulers) by `factor`.

    The server's schedule across rounds (`optimizer.warmup_rounds`, `optimizer.round_decay`)
    sends each round its factor; the module's own `configure_optimizers` is left as it is.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Multiply each param group's lr, and each scheduler's base lrs, by the factor."""
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor
                if "initial_lr" in group:
                    group["initial_lr"] *= self.factor
        for config in trainer.lr_scheduler_configs:
            base_lrs = getattr(config.scheduler, "base_lrs", None)
            if base_lrs is not None:
                config.scheduler.base_lrs = [lr * self.factor for lr in base_lrs]
