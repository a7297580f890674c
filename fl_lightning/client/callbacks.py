"""Lightning callbacks that add a federated algorithm's piece to any LightningModule's training.

They change the Trainer's optimisation from outside the module, so a user's module is
federated unchanged: FedProx's proximal term, SCAFFOLD's correction and the server's
learning-rate schedule across rounds. (DP-SGD's private optimizer is
`fl_lightning.privacy.dp_sgd.PrivateOptimizer`.)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class FedProx(Callback):
    """FedProx (Li et al., 2020): the gradient of (mu/2)||w - w_global||^2 added to every step.

    `w_global` is the module's weights when training starts (the round's global model,
    with the client's own personal layers, which `PersonalLayers` loads at fit start). The
    term is added to the gradients just before each optimizer step (after AMP unscaling,
    before Lightning's gradient clipping), which is what adding it to the loss gives.
    """

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.anchor: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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


class Scaffold(Callback):
    """SCAFFOLD (Karimireddy et al., 2020): every step's gradient corrected by c - c_i.

    `server` is the server's control variate c, by state-dict name (the floating entries;
    only trainable parameters take a correction). The client's own c_i is this callback's
    state (`state_dict`), which `fl_lightning.client.state.ClientState` keeps between the
    client's rounds; it starts at zero. After fit, c_i becomes c_i - c + (x - y) / (sum of
    the learning rates of the steps taken), option II of the paper with the step sizes
    the optimizer really used, and `delta` holds c_i's change, which the client sends.
    """

    def __init__(self, server: dict[str, torch.Tensor]) -> None:
        self.server = server
        self.own: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._key_of: dict[int, str] = {}  # id(parameter) -> its state-dict name
        self._start: dict[str, torch.Tensor] = {}
        self._correction: dict[str, torch.Tensor] = {}
        self._lr_sums: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        """c_i, kept by the client between its rounds."""
        return {"own": self.own}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """c_i as the client's previous round left it."""
        self.own = dict(state_dict["own"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the round's start weights x and fix each parameter's correction c - c_i."""
        named = pl_module.named_parameters()
        self._params = {k: p for k, p in named if p.requires_grad and k in self.server}
        self._key_of = {id(p): k for k, p in self._params.items()}
        # On the CPU: Lightning's teardown moves the module there before `on_fit_end`.
        self._start = {k: p.detach().cpu().clone() for k, p in self._params.items()}
        self._lr_sums = dict.fromkeys(self._params, 0.0)
        zero = torch.zeros_like
        self._correction = {
            k: (self.server[k] - self.own.get(k, zero(self.server[k]))).to(p.device)
            for k, p in self._params.items()
        }

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add c - c_i to each gradient, and count the step size it is taken with."""
        with torch.no_grad():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    key = self._key_of.get(id(parameter))
                    if key is None or parameter.grad is None:
                        continue
                    parameter.grad.add_(self._correction[key])
                    self._lr_sums[key] += float(group["lr"])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """c_i+ = c_i - c + (x - y) / sum(lr); `delta` = c_i+ - c_i."""
        own, delta = dict(self.own), {}
        for key, server in self.server.items():
            old = self.own.get(key, torch.zeros_like(server))
            new = old
            if key in self._params and self._lr_sums[key] > 0:
                moved = self._start[key] - self._params[key].detach().cpu()
                new = old - server + moved / self._lr_sums[key]
            own[key], delta[key] = new, new - old
        self.own, self.delta = own, delta


class PersonalLayers(Callback):
    """`strategy.local_parameters`: the client's own values of its personal entries.

    The entries come from the global model the first time; then each fit and validation
    starts from the client's own (this callback's Lightning state, kept by
    `fl_lightning.client.state.ClientState` between rounds), and each fit's end keeps them.
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.own: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """The client's personal entries."""
        return {"own": self.own}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The personal entries the client's previous round left."""
        self.own = dict(state_dict["own"])

    def _apply(self, pl_module: pl.LightningModule) -> None:
        if self.own:
            pl_module.load_state_dict(self.own, strict=False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Train from the client's own personal entries."""
        self._apply(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate with them (outside fit: the evaluate message)."""
        if trainer.state.fn == "validate":
            self._apply(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep what this round left of them."""
        state = pl_module.state_dict()
        self.own = {k: state[k].detach().cpu().clone() for k in self.keys}
