"""Sample-level differential privacy (DP-SGD) for a client's Lightning training, with Opacus.

Each client trains with Poisson-sampled batches, per-sample gradient clipping and Gaussian
noise: the optimizer of any LightningModule's `configure_optimizers` becomes Opacus's
DPOptimizer when fit starts (`PrivateOptimizer`, a callback).
Its Opacus accountant lives in the client's Flower `Context.state` between rounds, so the
epsilon it reports is cumulative over the whole run.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fl_lightning.config.schema import Config
from fl_lightning.errors import ClientError, ConfigError
from fl_lightning.privacy import randomness
from fl_lightning.privacy.fast_clipping import (
    FastClipping,
    FastDPOptimizer,
    Layer,
    fast_layers,
)
from fl_lightning.seeding import derive

M = TypeVar("M", bound=nn.Module)


def quiet_opacus() -> None:
    """Silence Opacus warnings that are expected here and that users cannot act on."""
    # Opacus's secure mode needs torchcsprng (no build for current torch); our generators
    # are seeded from OS entropy instead (`privacy.randomness`), as the README's Privacy says.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    # Opacus's hooks on the first layer, whose input needs no gradient: expected.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # Small partitions (high sample rates) reach the largest RDP order: a looser, still
    # valid bound.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    # privacy.max_physical_batch_size: Lightning steps a per-step scheduler after every
    # chunk, and the first chunks of the first batch come before the first real step.
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))


def make_private_compatible(model: M, name: str) -> M:
    """Opacus's `ModuleValidator.fix` (BatchNorm -> GroupNorm), or a ConfigError naming why not.

    BatchNorm mixes samples within a batch, so it has no per-sample gradient; its running
    statistics would also leak unclipped, unnoised data statistics to the server.
    """
    fixed = ModuleValidator.fix(model)
    errors = [
        *ModuleValidator.validate(fixed, strict=False),
        *GradSampleModule.validate(fixed, strict=False),
    ]
    if errors:
        raise ConfigError(
            f"{name} cannot be trained with differential privacy ({errors[0]}); "
            "use a model without that layer, or set privacy.mode=none"
        )
    return fixed


@dataclass(frozen=True)
class DPSGDPlan:
    """A client's DP-SGD parameters: Poisson sample rate, steps per round, noise multiplier."""

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    accountant: str = "rdp"  # Opacus's name of the accountant (privacy.accountant)

    def epsilon(self, rounds: int, delta: float) -> float:
        """Epsilon after `rounds` rounds of local training, from a fresh accountant."""
        if rounds == 0:
            return 0.0
        accountant = create_accountant(self.accountant)
        accountant.history = [
            (self.noise_multiplier, self.sample_rate, rounds * self.steps_per_round)
        ]
        return float(accountant.get_epsilon(delta))


def plan(cfg: Config, num_train: int) -> DPSGDPlan:
    """The DP-SGD plan of a client holding `num_train` training samples.

    Batches are Poisson samples with rate batch_size / num_train (Opacus's DPDataLoader:
    one epoch is 1 / rate steps). With `privacy.target_epsilon`, the noise multiplier is
    calibrated so that a client taking part in all `federation.num_rounds` rounds ends at
    that epsilon.
    """
    quiet_opacus()
    p = cfg.privacy
    # Exactly as Opacus derives them: DPDataLoader samples at 1 / len(loader) and yields
    # int(1 / rate) batches per epoch; its accountant hook records 1 / that many.
    batches = math.ceil(num_train / cfg.data.batch_size)
    steps_per_epoch = int(1 / (1 / batches))
    sample_rate = 1 / steps_per_epoch
    steps_per_round = cfg.trainer.max_epochs * steps_per_epoch
    if p.noise_multiplier is not None:
        sigma = p.noise_multiplier
    else:
        assert p.target_epsilon is not None  # enforced by config validation
        steps = steps_per_round * cfg.federation.num_rounds
        sigma = calibrated_noise(p.target_epsilon, p.delta, sample_rate, steps, p.accountant)
    return DPSGDPlan(sample_rate, steps_per_round, float(sigma), p.accountant)


@functools.lru_cache(maxsize=64)
def calibrated_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Opacus's noise multiplier for `epsilon` after `steps` steps at `sample_rate`.

    Remembered per process: a search over the accountant (about 2 s with PRV) that every
    client of the same size would otherwise repeat at every round.
    """
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


class ClientDPSGD:
    """One client's DP-SGD for one round: the Poisson loader, the private optimizer, epsilon.

    `accountant_state` is what `state()` returned after the client's previous round (None
    in its first), so the accountant composes every step the client ever took. Sampling and
    noise are secret (OS entropy) unless `privacy.reproducible_noise` seeds them from `seed`.
    """

    def __init__(
        self, cfg: Config, num_train: int, accountant_state: str | None, seed: int
    ) -> None:
        self.plan = plan(cfg, num_train)
        self.max_grad_norm = cfg.privacy.max_grad_norm
        self.delta = cfg.privacy.delta
        quiet_opacus()
        self.engine = PrivacyEngine(accountant=cfg.privacy.accountant)
        if accountant_state:
            # The steps taken so far; they mean the same to either accountant.
            history = json.loads(accountant_state)["history"]
            self.engine.accountant.history = [tuple(step) for step in history]
        self.privacy = cfg.privacy
        self.seed = seed
        self.poisson: DPDataLoader | None = None  # `loader`'s logical batches

    def loader(self, loader: DataLoader) -> DataLoader:
        """Poisson sampling over `loader`'s dataset (batch membership secret by default),
        each batch cut into chunks of `privacy.max_physical_batch_size` if set."""
        # Its own stream: `seed` itself seeds the round's global RNGs (dropout, augmentation).
        sampling = derive(self.seed, "dp-sgd-sampling")
        generator = randomness.torch_generator(self.privacy, sampling)
        self.poisson = poisson = DPDataLoader.from_data_loader(loader, generator=generator)
        size = self.privacy.max_physical_batch_size
        if size is None:
            return poisson
        chunks = PhysicalBatches(poisson.batch_sampler, size)
        return DataLoader(
            poisson.dataset,
            batch_sampler=chunks,
            collate_fn=poisson.collate_fn,
            num_workers=poisson.num_workers,
            generator=poisson.generator,
        )

    def make_private(
        self, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> torch.optim.Optimizer:
        """Per-sample clipping and noise for `optimizer`; each step is added to the accountant.

        Hooks are attached to `module` in place (`wrap_model=False`), so the Trainer keeps
        driving the LightningModule itself. Call `loader` first: Opacus reads the sample
        rate and expected batch size off its Poisson batches.
        """
        assert self.poisson is not None, "loader() first"
        noise = randomness.torch_generator(self.privacy, derive(self.seed, "dp-sgd-noise"))
        layers = fast_layers(module) if self.privacy.grad_sample_mode == "fast" else None
        if layers is not None:
            private_optimizer = self._fast(module, optimizer, layers, noise)
        else:
            _, private_optimizer, _ = self.engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=self.poisson,
                noise_multiplier=self.plan.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=False,  # `loader` already is a DPDataLoader
                noise_generator=noise,
                wrap_model=False,
            )
        # Opacus's defence against floating-point attacks on the noise (each draw the sum of
        # several Gaussians); PrivacyEngine only turns it on with torchcsprng installed.
        private_optimizer.secure_mode = not self.privacy.reproducible_noise
        return private_optimizer

    def _fast(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        layers: list[Layer],
        noise: torch.Generator | None,
    ) -> DPOptimizer:
        """What `PrivacyEngine.make_private` sets up, with `FastClipping` for its hooks."""
        assert self.poisson is not None
        owned = set(module.parameters())
        if any(p not in owned for group in optimizer.param_groups for p in group["params"]):
            raise ClientError(
                "privacy.mode=dp_sgd: the optimizer trains parameters outside the module"
            )
        sample_rate = 1 / len(self.poisson)
        private = FastDPOptimizer(
            optimizer,
            clipping=FastClipping(layers),
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=int(len(self.poisson.dataset) * sample_rate),
            generator=noise,
        )
        private.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate))
        return private

    def epsilon(self) -> float:
        """Cumulative epsilon of this client at `privacy.delta`."""
        if not self.engine.accountant.history:
            return 0.0
        return float(self.engine.accountant.get_epsilon(self.delta))

    def state(self) -> str:
        """The accountant's history as JSON, to keep in the client's Context.state."""
        return json.dumps(dict(self.engine.accountant.state_dict()))


class PrivateOptimizer(Callback):
    """DP-SGD for any LightningModule: its optimizer made private when `fit` starts.

    The module's own `configure_optimizers` runs as written; this callback then wraps the
    one optimizer it returned in Opacus's DPOptimizer (its schedulers keep working: they
    change the same param groups). `loader` is the Poisson-sampled training loader.
    """

    def __init__(self, dp: ClientDPSGD, loader: DataLoader) -> None:
        self.dp = dp
        self.loader = loader

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Replace the Trainer's optimizer with its private version."""
        if len(trainer.optimizers) != 1:
            raise ClientError(
                f"privacy.mode=dp_sgd: {type(pl_module).__name__}.configure_optimizers returns "
                f"{len(trainer.optimizers)} optimizers, and DP-SGD makes exactly one private"
            )
        private = self.dp.make_private(pl_module, trainer.optimizers[0])
        trainer.strategy.optimizers = [private]
        if isinstance(self.loader.batch_sampler, PhysicalBatches):
            self.loader.batch_sampler.optimizer = private  # chunks: step once per batch


class PhysicalBatches(Sampler[list[int]]):
    """Each Poisson batch in a fixed number of chunks; the private optimizer steps once per
    batch (Opacus's `BatchSplittingSampler`, with a length Lightning can count on).

    Opacus's splitter cuts a batch of n samples into ceil(n / max_size) chunks, so an
    epoch's number of chunks is random and Lightning, which ends the epoch after `len`
    batches, would drop the last ones, and with them private steps the accountant planned.
    Here every batch is cut into the same `per_batch` chunks (fewer if it holds fewer
    samples), sized for a batch 6 standard deviations above the expected size, so `len`
    bounds the epoch and Lightning runs it to its end. `optimizer` is set when fit starts.
    """

    def __init__(self, batches: UniformWithReplacementSampler, max_size: int) -> None:
        self.batches = batches
        rate = batches.sample_rate
        expected = rate * batches.num_samples
        largest = expected + 6 * math.sqrt(expected * (1 - rate))
        self.per_batch = max(1, math.ceil(largest / max_size))
        self.optimizer: DPOptimizer | None = None

    def __iter__(self) -> Iterator[list[int]]:
        assert self.optimizer is not None, "PrivateOptimizer sets it when fit starts"
        for batch in self.batches:
            parts = np.array_split(
                np.asarray(batch, dtype=np.int64), min(self.per_batch, max(len(batch), 1))
            )
            for index, part in enumerate(parts):
                self.optimizer.signal_skip_step(do_skip=index < len(parts) - 1)
                yield part.tolist()

    def __len__(self) -> int:
        return len(self.batches) * self.per_batch
