"""The run's one seeding scheme: NumPy's SeedSequence over the run's seed and named keys.

Every random stream of a run is seeded by `derive(seed, *keys)`: the initial model, the
subsample and the partitions, each client's round (shuffles, dropout, augmentation), each
round's sampling of clients, the per-sample data noise and DP noise made reproducible on
request. Streams under different keys are independent, and the same seed gives the same
streams on every machine. The one exception is the secret DP noise
(`fl_lightning.privacy.randomness`), which must not be derivable from the seed.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads where a generator is asked for, not with this module
    import torch

# Where Lightning keeps the seed for processes it spawns (DDP ranks reseed from it).
_PL_GLOBAL_SEED = "PL_GLOBAL_SEED"


def derive(seed: int, *keys: str | int) -> int:
    """A 32-bit seed for the stream named by `keys` (names and non-negative numbers)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return int(np.random.SeedSequence([seed, *words]).generate_state(1)[0])


def generator(seed: int, *keys: str | int) -> torch.Generator:
    """A private torch generator for the stream `keys` (torch's global RNG is untouched)."""
    import torch

    return torch.Generator().manual_seed(derive(seed, *keys))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's global RNGs seeded with `seed` inside, restored after.

    For code that draws from the global RNGs and is not ours (a LightningModule's
    initialization and dropout, a user's DataModule shuffling): Lightning's
    `seed_everything`, scoped by its `isolate_rng`, with `PL_GLOBAL_SEED` (which DDP
    ranks reseed from) set inside only. CUDA's generators are seeded but not restored:
    reading their state would start CUDA in a client that trains on the CPU.
    """
    import lightning as L
    from lightning.pytorch.utilities.seed import isolate_rng

    before = os.environ.get(_PL_GLOBAL_SEED)
    with isolate_rng(include_cuda=False):
        L.seed_everything(seed, verbose=False)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_PL_GLOBAL_SEED, None)
            else:
                os.environ[_PL_GLOBAL_SEED] = before
