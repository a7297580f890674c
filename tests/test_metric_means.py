"""Round metrics: example-weighted means in which no one client runs away with the value."""

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fl_lightning.server.metric_means import plausible, robust_weighted_mean


def records(losses: list[float], examples: list[int]) -> list[RecordDict]:
    return [
        RecordDict({"metrics": MetricRecord({"train/loss": loss, "num-examples": n})})
        for loss, n in zip(losses, examples, strict=True)
    ]


def test_where_every_value_is_plausible_the_mean_is_flowers_to_the_bit() -> None:
    replies = records([0.31, 0.29, 0.35, 0.30, 0.33], [120, 80, 100, 95, 105])
    ours = robust_weighted_mean(replies, "num-examples")
    assert dict(ours) == dict(aggregate_metricrecords(replies, "num-examples"))


def test_an_absurd_value_is_left_out_of_the_mean() -> None:
    # The review's attack: a train/loss of 1.7e308 became the run's logged loss (3.4e307).
    replies = records([0.31, 0.29, 0.35, 0.30, 1.7e308], [100] * 5)
    ours = robust_weighted_mean(replies, "num-examples")["train/loss"]
    assert ours == pytest.approx((0.31 + 0.29 + 0.35 + 0.30) / 4)


def test_one_client_cannot_move_an_accuracy_it_makes_up() -> None:
    honest = [0.74, 0.75, 0.76, 0.73, 0.75, 0.74, 0.76, 0.75, 0.74]
    assert plausible([*honest, 1.0]) == [True] * 9 + [False]
    assert all(plausible([*honest, 0.70]))  # an honest laggard still counts


def test_with_two_replies_there_is_no_majority_to_judge_by() -> None:
    assert plausible([0.3, 1e300]) == [True, True]
