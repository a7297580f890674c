"""How every round ends, whatever runs it: centralized evaluation, checkpoints, one log record."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from fl_lightning.config import OptimizerConfig
from fl_lightning.evaluation import CentralEvaluator
from fl_lightning.rundir import RunDir
from fl_lightning.tracking import RunTracker

if TYPE_CHECKING:  # opacus loads only for runs with differential privacy
    from fl_lightning.privacy_ledger import PrivacyLedger


def round_lr(o: OptimizerConfig, server_round: int) -> float:
    """Client learning rate in `server_round` (1-based): warmup, then decay."""
    warmup = min(1.0, server_round / o.warmup_rounds) if o.warmup_rounds else 1.0
    return o.lr * warmup * o.round_decay ** (server_round - 1)


class RoundRecorder:
    """Collects a round's client metrics and closes the round with the global model.

    Shared by the Message-API strategies and the SecAgg+ (legacy API) path, so both log
    the same record: `train/*`, `distributed/*`, `centralized/*`, `epsilon`, `seconds`.
    """

    def __init__(
        self,
        evaluator: CentralEvaluator,
        tracker: RunTracker,
        run: RunDir,
        ledger: PrivacyLedger | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.tracker = tracker
        self.run = run
        self.ledger = ledger
        self.metrics: dict[str, float] = {}
        self._started = time.perf_counter()

    def start(self) -> None:
        """A round (or the initial evaluation) begins: reset its metrics and clock."""
        self.metrics = {}
        self._started = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        """Client metrics aggregated this round (`train/*`, `distributed/*`, ...)."""
        self.metrics.update(metrics)

    def close(self, server_round: int, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Evaluate the global model on the test split, checkpoint it, log the round record."""
        metrics = self.evaluator.evaluate(state_dict)
        self.evaluator.save_checkpoint(self.run.checkpoint(f"round_{server_round}"))
        self.evaluator.save_checkpoint(self.run.checkpoint("last"))
        elapsed = time.perf_counter() - self._started
        privacy = self.ledger.metrics() if self.ledger is not None else {}
        self.tracker.log_round(
            server_round, {**self.metrics, **metrics, **privacy, "seconds": elapsed}
        )
        return metrics
