"""DP-FedAvg's release: the mean of m clipped updates as a sum over n sampled, plus noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl_lightning.privacy.randomness import add_gaussian_noise


def noised_release(
    mean: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    replied: int,
    sampled: int,
    noise_multiplier: float,
    clipping_norm: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The model `reference` plus the released update, in `mean`'s dtypes.

    `mean` is the global model plus the mean of the `replied` clipped updates. The
    release is their sum over the `sampled` clients (a client that did not reply, or was
    rejected, counts as a zero update) plus noise of std `noise_multiplier *
    clipping_norm / sampled`: its sensitivity to any one client is `clipping_norm /
    sampled` whoever replied, which is what the ledger's epsilon assumes. (A mean over
    those who replied would make both depend on who replied.)
    """
    share = replied / sampled
    released = [
        np.asarray(g + share * (a - g), dtype=a.dtype) for a, g in zip(mean, reference, strict=True)
    ]
    add_gaussian_noise(released, noise_multiplier * clipping_norm / sampled, rng)
    return released
