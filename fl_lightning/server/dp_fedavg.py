"""Client-level differential privacy (DP-FedAvg): Flower's fixed-clipping wrappers and mod."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fl_lightning.config.schema import Config, sampled_clients
from fl_lightning.privacy import randomness
from fl_lightning.privacy.ledger import PrivacyLedger
from fl_lightning.privacy.release import noised_release
from fl_lightning.server.strategy import LightningFedAvg


class _LedgerMixin:
    """Flower's DP-FedAvg wrapper: screened, clipped, noised over a fixed denominator.

    Replaces Flower's `aggregate_train` (its sampling and configuration stay):
    - Replies are screened (`RoundScreen.train`) first: a malformed reply must
      not reach the clipping, and one failed reply would make Flower skip the whole round.
    - Every update the server sees is clipped to `clipping_norm`, also with client-side
      clipping (a no-op for an honest client, a bound on a dishonest one); a zero update
      stays zero (Flower's clipping divides by its norm).
    - The release (`fl_lightning.privacy.release`) is the sum of the m usable clipped
      updates over the n clients sampled, plus noise calibrated to that sum.
    - The noise is drawn from a secret generator (`privacy.randomness`), not NumPy's
      global one.
    """

    num_sampled_clients: int
    noise_multiplier: float
    clipping_norm: float
    current_arrays: ArrayRecord

    def __init__(
        self, strategy: LightningFedAvg, ledger: PrivacyLedger, cfg: Config, **kwargs: Any
    ) -> None:
        super().__init__(strategy, **kwargs)  # type: ignore[call-arg]
        self.ledger = ledger
        self.privacy = cfg.privacy
        self.seed = cfg.seed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's configuration; the global model is kept to clip the updates against."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, clip, average, add calibrated noise, then account for the release."""
        inner = cast(LightningFedAvg, self.strategy)  # type: ignore[attr-defined]
        usable = inner.updates.train(server_round, replies)
        for reply in usable:
            reply.content["arrays"] = clip_update(
                reply.content.array_records["arrays"], self.current_arrays, self.clipping_norm
            )
        arrays, metrics = inner.aggregate_train(server_round, usable)
        if arrays is None:
            return None, metrics
        keys = list(arrays.keys())
        values = noised_release(
            [arrays[k].numpy() for k in keys],
            [self.current_arrays[k].numpy() for k in keys],
            len(usable),
            self.num_sampled_clients,
            self.noise_multiplier,
            self.clipping_norm,
            randomness.numpy_generator(self.privacy, self.seed, server_round),
        )
        self.ledger.record_release()
        released = ArrayRecord({k: Array(v) for k, v in zip(keys, values, strict=True)})
        # A test of the release: post-processing.
        problem = inner.recorder.adoption_problem(released.to_torch_state_dict())
        if problem is not None:
            return inner.refuse_adopted(problem, server_round)
        return released, metrics


def clip_update(arrays: ArrayRecord, reference: ArrayRecord, norm: float) -> ArrayRecord:
    """`arrays` with its update from `reference` scaled down to L2 norm at most `norm`."""
    updates = {k: a.numpy().astype(np.float64) - reference[k].numpy() for k, a in arrays.items()}
    total = math.sqrt(sum(float(np.square(u).sum()) for u in updates.values()))
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return ArrayRecord(
        {
            k: Array(np.asarray(reference[k].numpy() + u * scale, dtype=arrays[k].numpy().dtype))
            for k, u in updates.items()
        }
    )


class ServerSideClipping(_LedgerMixin, DifferentialPrivacyServerSideFixedClipping):
    """DP-FedAvg, the server clips each update: it sees raw updates, releases a noised mean."""


class ClientSideClipping(_LedgerMixin, DifferentialPrivacyClientSideFixedClipping):
    """DP-FedAvg, clients clip their own updates (`fixedclipping_mod`); the server adds noise."""


def wrap_strategy(strategy: LightningFedAvg, cfg: Config, ledger: PrivacyLedger) -> Strategy:
    """`strategy` inside Flower's DP wrapper for `privacy.clipping`, accounted by `ledger`."""
    cls = ServerSideClipping if cfg.privacy.clipping == "server" else ClientSideClipping
    return cls(
        strategy,
        ledger,
        cfg,
        noise_multiplier=ledger.client_dp_noise_multiplier,
        clipping_norm=cfg.privacy.clipping_norm,
        num_sampled_clients=sampled_clients(cfg.federation),
    )
