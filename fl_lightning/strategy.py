"""FedAvg that evaluates the global model centrally and logs every round (Flower Message API)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    MetricRecordValues,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_lightning.evaluation import CentralEvaluator
from fl_lightning.rundir import RunDir
from fl_lightning.tracking import RunTracker


def restore_integer_arrays(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Give integer buffers (BatchNorm's `num_batches_tracked`) back their dtype after averaging.

    Weighted averaging turns them into floats, which `load_state_dict` would truncate; the
    global model keeps the rounded mean of the clients' counters, as an integer.
    """
    restored = ArrayRecord()
    for key, array in aggregated.items():
        dtype = np.dtype(reference[key].dtype)
        values = array.numpy()
        if np.issubdtype(dtype, np.integer) and values.dtype != dtype:
            array = Array(np.asarray(np.rint(values), dtype=dtype))  # 0-d stays an ndarray
        restored[key] = array
    return restored


class LightningFedAvg(FedAvg):
    """FedAvg whose rounds end with centralized evaluation, a checkpoint and one log record.

    Client train replies carry `train/*` metrics, evaluate replies `val/*`; their
    example-weighted means are logged as `train/*` and `distributed/*`.
    """

    def __init__(
        self, evaluator: CentralEvaluator, tracker: RunTracker, run: RunDir, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.evaluator = evaluator
        self.tracker = tracker
        self.run = run
        self._round_metrics: dict[str, float] = {}
        self._round_started = time.perf_counter()
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients for training and start the round's clock."""
        self._round_started = time.perf_counter()
        self._round_metrics = {}
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg, with integer buffers restored and the train metrics kept for the round's log."""
        replies = _report_errors(list(replies), "train")
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self._global is not None:
            arrays = restore_integer_arrays(arrays, self._global)
        if metrics is not None:
            self._round_metrics.update(_client_metrics(metrics, "train/", "train/"))
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' `val/*` metrics, kept as `distributed/*`."""
        replies = _report_errors(list(replies), "evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self._round_metrics.update(_client_metrics(metrics, "val/", "distributed/"))
        return metrics

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralized evaluation (Flower's `evaluate_fn`): test split, checkpoint, round record."""
        if server_round == 0:
            self._round_started = time.perf_counter()
        metrics = self.evaluator.evaluate(arrays.to_torch_state_dict())
        self.evaluator.save_checkpoint(self.run.checkpoint(f"round_{server_round}"))
        self.evaluator.save_checkpoint(self.run.checkpoint("last"))
        record = {
            **self._round_metrics,
            **metrics,
            "seconds": time.perf_counter() - self._round_started,
        }
        self.tracker.log_round(server_round, record)
        values: dict[str, MetricRecordValues] = dict(metrics)
        return MetricRecord(values)


def _report_errors(replies: list[Message], stage: str) -> list[Message]:
    """Warn about each failed client reply (Flower itself logs them at INFO only)."""
    for reply in replies:
        if reply.has_error():
            log(
                WARNING,
                "client %s failed in %s: %s",
                reply.metadata.src_node_id,
                stage,
                reply.error.reason,
            )
    return replies


def _client_metrics(metrics: MetricRecord, prefix: str, renamed: str) -> dict[str, float]:
    return {
        renamed + key[len(prefix) :]: float(value)  # type: ignore[arg-type]
        for key, value in metrics.items()
        if key.startswith(prefix)
    }
