"""A round's metrics from its replies: example-weighted means in which no client can run away.

A reply's metrics are finite numbers by the time they come here (the reply screen), but a
finite number can still be absurd (a `train/loss` of 1.7e308) or just out of line with the
rest (a `val/accuracy` of 1.0 among 0.75s). So each logged value is the example-weighted
mean over the replies whose value the round's others make plausible: within
`SPREAD` robust standard deviations of the median (1.4826 x the median absolute
deviation, and at least `MIN_SCALE` of the median's size). With fewer than 3 replies every value
counts (no majority to judge by). One client can move a logged value by at most its
weight times that band; its own value, and the median, stay in the per-client logs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from flwr.app import MetricRecord, RecordDict

SPREAD = 5.0
MIN_SCALE = 0.05  # the band is at least SPREAD x 5% of the median wide, each way
MIN_REPLIES = 3
# Median absolute deviation -> standard deviation, for normally distributed values.
_MAD_TO_STD = 1.4826


def plausible(values: Sequence[float]) -> list[bool]:
    """Which of a round's values (one per reply) are within the band the others make."""
    if len(values) < MIN_REPLIES:
        return [True] * len(values)
    median = statistics.median(values)
    deviation = statistics.median(abs(v - median) for v in values)
    scale = max(_MAD_TO_STD * deviation, MIN_SCALE * abs(median))
    return [abs(v - median) <= SPREAD * scale for v in values]


def robust_weighted_mean(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Flower's metric aggregation (`aggregate_metricrecords`) over plausible values only.

    Each metric's mean is taken over the replies whose value is plausible, with their
    weights normalised over those replies; the arithmetic is Flower's, in reply order, so
    where every value is plausible the result is Flower's to the bit.
    """
    metrics = [next(iter(record.metric_records.values())) for record in records]
    keys = [key for key in metrics[0] if key != weighting_key] if metrics else []
    aggregated = MetricRecord()
    for key in keys:
        values = [float(m[key]) for m in metrics]  # type: ignore[arg-type]
        kept = [
            (value, float(m[weighting_key]))  # type: ignore[arg-type]
            for value, m, ok in zip(values, metrics, plausible(values), strict=True)
            if ok
        ]
        total = sum(weight for _, weight in kept)
        mean = 0.0
        for index, (value, weight) in enumerate(kept):
            term = value * (weight / total)
            mean = term if index == 0 else mean + term
        aggregated[key] = mean
    return aggregated
