"""The server's view of the global model: centralized evaluation on the test data, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from fl_lightning.config.schema import Config
from fl_lightning.files import write_atomically
from fl_lightning.models.build import build_model
from fl_lightning.models.trainer import evaluate, evaluation_stage, make_trainer, one_device
from fl_lightning.seeding import derive, seeded
from fl_lightning.server.checks import one_line


class CentralEvaluator:
    """Holds the server-side LightningModule, Trainer and test data, built once for the run.

    The test data is the built-in dataset's test split or the DataModule's
    `test_dataloader` (`fl_lightning.data.loaders.central_test_loader`); the server never opens
    a client's training data.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        with seeded(derive(cfg.seed, "initial-model")):  # the run's initial global model
            self.model: L.LightningModule = build_model(cfg)
        # Evaluation needs one device; DDP would shard (and pad) the test set.
        self.trainer = make_trainer(
            cfg.trainer, devices=one_device(cfg.trainer), strategy="auto", limit_val_batches=1.0
        )  # a module without test_step is tested by its validation_step: on every batch
        self.loader, self.noisy_loader = _test_loaders(cfg)
        self.stage = evaluation_stage(self.model)
        if self.stage is None:  # never tested, so attach it here for its checkpoints
            self.trainer.strategy.connect(self.model)
        self._probe: tuple[L.LightningModule, L.Trainer] | None = None  # see `probe`

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Make `state_dict` the model the next checkpoint holds, without testing it."""
        self.model.load_state_dict(state_dict)

    def evaluate(
        self, state_dict: dict[str, torch.Tensor], noisy: bool = False
    ) -> dict[str, float]:
        """Load `state_dict` and return what the module's `test_step` logs (`test/accuracy`...),
        or its `validation_step` without one; nothing for a module with neither.

        `noisy=True` evaluates on the test split with `data.noise` applied instead.
        """
        self.load(state_dict)
        if self.stage is None:
            return {}
        loader = self.noisy_loader if noisy else self.loader
        return evaluate(self.trainer, self.model, loader, self.stage)

    def probe(self, state_dict: dict[str, torch.Tensor]) -> str | None:
        """Why the server should not adopt `state_dict`: its test metrics on the first test
        batch are not finite (or its test step fails); None if they are.

        One batch costs milliseconds, not the full test split's seconds, so every round's
        new model is tested before the next round trains on it.
        """
        if self.stage is None:
            return None  # nothing to test with (the updates were screened as numbers)
        if self._probe is None:
            # Its own module and Trainer: the round-closing thread may be evaluating the
            # previous round with the evaluator's own, at idle priority, as this one runs.
            trainer = make_trainer(
                self.cfg.trainer, devices=one_device(self.cfg.trainer), strategy="auto",
                limit_test_batches=1, limit_val_batches=1,
            )  # fmt: skip
            self._probe = (build_model(self.cfg), trainer)
        model, trainer = self._probe
        model.load_state_dict(state_dict)
        try:
            metrics = evaluate(trainer, model, self.loader, self.stage)
        except Exception as err:  # the user's test_step on weights it cannot handle
            return f"the server's test of it failed ({type(err).__name__}: {one_line(str(err))})"
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            return (
                f"its test metrics {', '.join(bad)} on the server's first test batch are not finite"
            )
        return None

    def save_checkpoint(self, path: Path) -> None:
        """Write a Lightning checkpoint of the last evaluated weights, atomically and durably."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(
            path, lambda partial: self.trainer.save_checkpoint(partial, weights_only=True)
        )


def _test_loaders(cfg: Config) -> tuple[DataLoader, DataLoader]:
    """The clean test loader and the one with `data.noise` (built-in datasets only), each
    cut to the same `evaluation.max_samples` samples."""
    from fl_lightning.data.loaders import central_test_loader, test_subset

    if cfg.data.class_path is not None:
        clean = noisy = central_test_loader(cfg)
    else:
        from fl_lightning.data.datamodule import FederatedDataModule

        datamodule = FederatedDataModule(cfg.data, cfg.seed)
        clean, noisy = datamodule.test_dataloader(), datamodule.noisy_test_dataloader()
    cap = cfg.evaluation.max_samples
    return test_subset(clean, cap, cfg.seed), test_subset(noisy, cap, cfg.seed)
