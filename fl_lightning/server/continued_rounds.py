"""A resumed run's rounds: Flower counts from 1 again, the strategy sees the run's numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class ContinuedRounds(Strategy):
    """`strategy` with every round number shifted by `offset`, the rounds already completed.

    Flower's `Strategy.start` numbers rounds 1..num_rounds; wrapped like this (outermost,
    around the privacy wrapper too), every part of the run (sampling, the lr schedule,
    the noise, the round records) numbers them as the uninterrupted run would have. The
    starting model was evaluated before the kill: `evaluate(0)` does nothing.
    """

    def __init__(
        self, strategy: Strategy, offset: int, evaluate_fn: Callable[[int, ArrayRecord], Any]
    ) -> None:
        self.strategy = strategy
        self.offset = offset
        self.evaluate_fn = evaluate_fn

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """`evaluate_fn` (Flower's centralized evaluation), in the run's round numbers."""
        if server_round == 0:
            return None  # the starting model was evaluated before the kill
        return cast(MetricRecord | None, self.evaluate_fn(server_round + self.offset, arrays))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The strategy's, in the run's round numbers."""
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's, in the run's round numbers."""
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The strategy's, in the run's round numbers."""
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The strategy's, in the run's round numbers."""
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        """The strategy's."""
        self.strategy.summary()
