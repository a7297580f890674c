"""SCAFFOLD's server control variate c: zero at first, moved by the clients' changes.

c is kept by state-dict name over the global model's floating-point entries (only the
trainable parameters ever move). Each round, c += (|S| / N) * mean of the changes of the
|S| clients whose update was adopted, N the number of clients (Karimireddy et al., 2020,
option II). Screened like the weights (`fl_lightning.server.reply_screen`,
`round_screen`) before they are used.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def zero_control(global_arrays: ArrayRecord) -> ArrayRecord:
    """c at the start: zeros for each floating-point entry of the global model."""
    zeros = {}
    for key, array in global_arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            zeros[key] = Array(np.zeros_like(values))
    return ArrayRecord(zeros)


def moved_control(control: ArrayRecord, changes: list[ArrayRecord], share: float) -> ArrayRecord:
    """c + share * the mean of the clients' changes (share: |S| / N); c as it was if that
    is not finite (finite but huge changes overflow), which would poison every later round."""
    if not changes:
        return control
    moved = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for key, array in control.items():
            mean = np.mean([change[key].numpy() for change in changes], axis=0)
            value = np.asarray(array.numpy() + share * mean, dtype=array.numpy().dtype)
            if not np.isfinite(value).all():
                return control
            moved[key] = Array(value)
    return ArrayRecord(moved)
