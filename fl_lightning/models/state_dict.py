"""Which entries of a model's state dict travel: the floating-point ones SecAgg+ sums, and
all but a client's personal layers (`strategy.local_parameters`).

SecAgg+ returns floats and mis-restores 0-d arrays, so integer buffers (BatchNorm's
`num_batches_tracked`) stay out of the secure sum; both sides rebuild the rest from a
model of the same architecture.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def floating_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The state-dict entries that go through the secure sum: the floating-point ones."""
    return [key for key, value in state.items() if value.is_floating_point()]


def with_floating(
    template: dict[str, torch.Tensor], arrays: Sequence[np.ndarray]
) -> dict[str, torch.Tensor]:
    """`template` with `arrays` as its floating-point entries, in `floating_keys` order."""
    state = dict(template)
    keys = floating_keys(template)
    state.update({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})
    return state


def personal_keys(keys: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The entries `strategy.local_parameters` keeps on each client: names fully matching
    one of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return [k for k in keys if any(c.fullmatch(k) for c in compiled)]
