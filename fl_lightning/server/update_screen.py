"""The update screen: a reply whose update is far larger than an honest one is left out.

A client's update is its weights minus the global model's, its size the L2 norm over every
floating-point array (float64, so float32 weights never overflow it). Finite weights can
still wreck a round: one client sending 1e30 makes FedAvg's mean 1e29 and overflows
FedAdam's second moment. Honest updates of one round differ by far less than a hundredfold,
even between clients of very unequal sizes; so a reply whose norm is more than
`strategy.update_norm_factor` (100) times the median of the round's norms is rejected
before aggregation, as is one over `strategy.max_update_norm` (for users who know their
scale).

What it catches and what it cannot:
- The median is robust to fewer than half the replies: with 3 or more replies a minority
  of attackers cannot raise the bar. With 2 replies the median is their mean: one of two
  clients sending 1e30 is not caught here (the server's test of each new model before it
  is adopted still refuses a model that no longer computes finite metrics).
- A boosted update under the bar (50x the median with the default 100) passes: the
  screen stops absurd updates, not subtle poisoning; combine it with a robust strategy
  (krum, fedmedian, fedtrimmedavg), or a `max_update_norm` of your scale, against that.
- It is not applied where the server cannot or must not look at single updates: under
  SecAgg+ (it sees only the sum) and under client-level DP, whose clipping already bounds
  each update and whose noise calibration would not hold if one client's update decided
  whether another's is used (`max_update_norm` alone, which depends on nothing but the
  update itself, still applies there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord


def update_norms(updates: Sequence[ArrayRecord], reference: ArrayRecord) -> list[float]:
    """Each record's L2 distance from `reference` over the floating-point arrays, in float64."""
    base = {
        key: array.numpy().astype(np.float64).ravel()
        for key, array in reference.items()
        if np.issubdtype(np.dtype(array.dtype), np.floating)
    }  # integer buffers (BatchNorm's counters) are not learned
    norms = []
    for arrays in updates:
        total = 0.0
        for key, values in base.items():
            delta = arrays[key].numpy().astype(np.float64).ravel() - values
            total += float(np.dot(delta, delta))
        norms.append(math.sqrt(total))
    return norms


def norm_problems(
    norms: Sequence[float], factor: float | None, bound: float | None
) -> list[str | None]:
    """Why each update of a round is too large to be honest, None for those that are not.

    `factor` bounds a norm relative to the median of `norms`, `bound` absolutely.
    """
    finite = [norm for norm in norms if math.isfinite(norm)]
    median = float(np.median(finite)) if finite else 0.0
    problems: list[str | None] = []
    for norm in norms:
        if not math.isfinite(norm):
            problems.append(f"its update's norm is {norm}")
        elif bound is not None and not norm <= bound:
            problems.append(
                f"its update's norm {norm:.3g} is over strategy.max_update_norm={bound:g}"
            )
        elif factor is not None and median > 0 and not norm <= factor * median:
            problems.append(
                f"its update's norm {norm:.3g} is more than {factor:g}x the round's median "
                f"{median:.3g} (strategy.update_norm_factor)"
            )
        else:
            problems.append(None)
    return problems
