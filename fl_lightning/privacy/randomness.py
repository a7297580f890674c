"""Where differential privacy's randomness comes from: secret by default, seeded on request.

DP noise and DP-SGD's Poisson sampling protect data only while nobody can recompute them.
The config (and so `seed`) is known to the server, so by default every generator here is
seeded from the operating system's cryptographically secure entropy (`secrets`), fresh
for each client round or release: no config value reproduces it. With
`privacy.reproducible_noise: true` they are seeded from (seed, round, client) instead:
same seed, same run, for research, and the stated epsilon does not hold against anyone
who knows the seed.

The generators themselves are torch's and NumPy's PRNGs, not a cryptographic stream:
Opacus's own secure mode needs `torchcsprng`, which has no build for current torch.
DP-SGD noise additionally uses Opacus's floating-point-attack-resistant sampling (the sum
of several Gaussian draws, `DPOptimizer.secure_mode`).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from fl_lightning.config.schema import PrivacyConfig
from fl_lightning.seeding import derive

# What the console, summary.md and the README say when a run opts into seeded noise.
REPRODUCIBLE_WARNING = (
    "privacy.reproducible_noise is true: DP noise and sampling are seeded from `seed`, so "
    "the stated epsilon does NOT hold against anyone who knows the seed (the server does)"
)


def _secret_seed() -> int:
    # 64 bits: what torch.Generator.manual_seed takes; beyond a brute force of the seed.
    return secrets.randbits(64)


def torch_generator(privacy: PrivacyConfig, seed: int) -> torch.Generator:
    """A CPU generator: seeded from `seed` if the run asked for reproducible noise, else secret."""
    chosen = seed if privacy.reproducible_noise else _secret_seed()
    return torch.Generator().manual_seed(chosen)


def numpy_generator(privacy: PrivacyConfig, seed: int, server_round: int) -> np.random.Generator:
    """A NumPy generator for the server's noise in `server_round` (secret unless reproducible)."""
    if privacy.reproducible_noise:
        return np.random.default_rng(derive(seed, "client-dp-noise", server_round))
    # No seed: NumPy draws 128 bits from the OS's entropy (SeedSequence).
    return np.random.default_rng()


def add_gaussian_noise(arrays: list[np.ndarray], std: float, rng: np.random.Generator) -> None:
    """Add N(0, std^2) to every entry of `arrays`, in place, in each array's own dtype."""
    for array in arrays:
        array += rng.normal(0.0, std, array.shape).astype(array.dtype, copy=False)
