"""The update screen: updates far larger than the round's others are left out."""

import numpy as np
from flwr.app import Array, ArrayRecord

from fl_lightning.server.update_screen import norm_problems, update_norms


def test_the_norm_of_an_update_never_overflows() -> None:
    reference = ArrayRecord(
        {"w": Array(np.zeros((3, 4), np.float32)), "n": Array(np.array(5, np.int64))}
    )
    huge = ArrayRecord(
        {"w": Array(np.full((3, 4), 3e38, np.float32)), "n": Array(np.array(10**12, np.int64))}
    )
    # float32's largest value squared overflows float32; in float64 it does not.
    assert update_norms([huge, reference], reference) == [
        np.sqrt(12) * np.float64(np.float32(3e38)),
        0.0,  # integer counters are not updates
    ]


def test_an_update_far_above_the_rounds_median_is_a_problem() -> None:
    honest = [1.0, 1.3, 0.8, 1.1]
    problems = norm_problems([*honest, 1e30], factor=10.0, bound=None)
    assert problems[:4] == [None] * 4
    assert "more than 10x the round's median 1.1" in str(problems[4])
    assert norm_problems([*honest, 9.0], 10.0, None)[4] is None  # boosted, under the bar
    assert norm_problems([*honest, float("nan")], 10.0, None)[4] is not None
    # Two replies: their median is their mean, so one of two is not caught by the factor...
    assert norm_problems([1.0, 1e30], 10.0, None) == [None, None]
    # ...but an absolute bound catches it whatever the others send.
    assert norm_problems([1.0, 1e30], 10.0, 100.0)[1] == (
        "its update's norm 1e+30 is over strategy.max_update_norm=100"
    )
    assert norm_problems([0.0, 0.0, 3.0], 10.0, None) == [None] * 3  # a median of 0: no scale
