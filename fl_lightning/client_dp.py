"""Client-level differential privacy (DP-FedAvg): Flower's fixed-clipping wrappers and mod."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fl_lightning import dp_randomness
from fl_lightning.config import Config, PrivacyConfig, sampled_clients
from fl_lightning.dp_randomness import add_gaussian_noise
from fl_lightning.privacy_ledger import PrivacyLedger
from fl_lightning.strategy import LightningFedAvg


class _LedgerMixin:
    """Flower's DP-FedAvg wrapper: screened, clipped, noised over a fixed denominator.

    Replaces Flower's `aggregate_train` (its sampling and configuration stay):
    - Replies are screened (`LightningFedAvg.screen_train`) first: a malformed reply must
      not reach the clipping, and one failed reply would make Flower skip the whole round.
    - Every update the server sees is clipped to `clipping_norm`, also with client-side
      clipping (a no-op for an honest client, a bound on a dishonest one); a zero update
      stays zero (Flower's clipping divides by its norm).
    - The release is the sum of the m usable clipped updates over the n clients sampled
      (a missing or rejected client counts as a zero update), plus noise of std
      `noise_multiplier * clipping_norm / n`: its sensitivity to any one client is
      `clipping_norm / n` whoever replied, which is what the ledger's epsilon assumes.
      (A mean over the m who replied would make both the sensitivity and the noise
      depend on who replied, and its epsilon would not be the ledger's.)
    - The noise is drawn from a secret generator (`dp_randomness`), not NumPy's global one.
    """

    ledger: PrivacyLedger
    num_sampled_clients: int
    noise_multiplier: float
    clipping_norm: float
    current_arrays: ArrayRecord
    privacy: PrivacyConfig
    seed: int

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
        usable = inner.screen_train(server_round, replies)
        for reply in usable:
            reply.content["arrays"] = clip_update(
                reply.content.array_records["arrays"], self.current_arrays, self.clipping_norm
            )
        arrays, metrics = inner.aggregate_train(server_round, usable)
        if arrays is None:
            return None, metrics
        sampled = self.num_sampled_clients
        share = len(usable) / sampled  # the mean of m updates, as a sum over n
        values = {
            key: np.asarray(
                reference + share * (array.numpy() - reference), dtype=array.numpy().dtype
            )
            for key, array in arrays.items()
            for reference in [self.current_arrays[key].numpy()]
        }
        std = self.noise_multiplier * self.clipping_norm / sampled
        rng = dp_randomness.numpy_generator(
            self.privacy, self.seed, server_round + inner.round_offset
        )
        add_gaussian_noise(list(values.values()), std, rng)
        self.ledger.record_release()
        released = ArrayRecord({key: Array(value) for key, value in values.items()})
        problem = inner.adoption_problem(released)  # post-processing of the release
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
    wrapper = cls(
        strategy,
        noise_multiplier=ledger.client_dp_noise_multiplier,
        clipping_norm=cfg.privacy.clipping_norm,
        num_sampled_clients=sampled_clients(cfg.federation),
    )
    wrapper.ledger = ledger
    wrapper.privacy = cfg.privacy
    wrapper.seed = cfg.seed
    return wrapper
