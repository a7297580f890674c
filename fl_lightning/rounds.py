"""How every round ends, whatever runs it: centralized evaluation, checkpoints, one log record."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from fl_lightning import resume
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
    the same record: `train/*`, `distributed/*`, `centralized/*`, `epsilon`, `seconds`,
    and where the round's seconds went (`time/client_training`, `time/aggregation`,
    `time/client_evaluation`, `time/centralized_evaluation`, `time/checkpoint`).
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
        self.strategy: object | None = None  # whose cross-round state --resume restores
        self.metrics: dict[str, float] = {}
        self._started = self._lap = time.perf_counter()

    def start(self) -> None:
        """A round (or the initial evaluation) begins: reset its metrics and clock."""
        self.metrics = {}
        self._started = self._lap = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Record the seconds since the previous lap as `time/<phase>` (where rounds go)."""
        now = time.perf_counter()
        self.metrics[f"time/{phase}"] = self.metrics.get(f"time/{phase}", 0.0) + now - self._lap
        self._lap = now

    def count(self, **counts: int) -> None:
        """Add to this round's counters (`failures`, `rejected`), logged even when zero."""
        for name, n in counts.items():
            self.metrics[name] = self.metrics.get(name, 0) + n

    def add(self, metrics: dict[str, float]) -> None:
        """Client metrics aggregated this round (`train/*`, `distributed/*`, ...)."""
        self.metrics.update(metrics)

    def close(self, server_round: int, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Evaluate the global model on the test split, checkpoint it, log the round record."""
        self.lap("between")  # anything since the last lap (the strategy's own bookkeeping)
        metrics = self.evaluator.evaluate(state_dict)
        self.lap("centralized_evaluation")
        self.evaluator.save_checkpoint(self.run.checkpoint(f"round_{server_round}"))
        self.evaluator.save_checkpoint(self.run.checkpoint("last"))
        self.lap("checkpoint")
        elapsed = time.perf_counter() - self._started
        privacy = self.ledger.metrics() if self.ledger is not None else {}
        self.tracker.log_round(
            server_round, {**self.metrics, **metrics, **privacy, "seconds": elapsed}
        )
        # Last: a round counts as completed for --resume once everything above is written.
        resume.save(
            self.run,
            resume.ResumeState(
                server_round,
                {k: v.detach().cpu() for k, v in state_dict.items()},
                resume.strategy_state(self.strategy) if self.strategy is not None else {},
                self.tracker.history,
                self.ledger.state() if self.ledger is not None else None,
                resume.capture_rng(),
            ),
        )
        return metrics
