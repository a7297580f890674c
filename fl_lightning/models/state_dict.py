"""A model's state dict as SecAgg+ sums it: its floating-point entries, as numpy arrays.

SecAgg+ returns floats and mis-restores 0-d arrays, so integer buffers (BatchNorm's
`num_batches_tracked`) stay out of the secure sum; both sides rebuild the rest from a
model of the same architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

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
