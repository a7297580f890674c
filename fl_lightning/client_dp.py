"""Client-level differential privacy (DP-FedAvg): Flower's fixed-clipping wrappers and mod."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fl_lightning.config import Config, sampled_clients
from fl_lightning.privacy_ledger import PrivacyLedger


class _LedgerMixin:
    """Adds each noised aggregate the wrapper releases to the run's privacy ledger."""

    ledger: PrivacyLedger

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (server side), aggregate and add noise as Flower does, then account for it."""
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self.ledger.record_release()
        return arrays, metrics


class ServerSideClipping(_LedgerMixin, DifferentialPrivacyServerSideFixedClipping):
    """DP-FedAvg, the server clips each update: it sees raw updates, releases a noised mean."""


class ClientSideClipping(_LedgerMixin, DifferentialPrivacyClientSideFixedClipping):
    """DP-FedAvg, clients clip their own updates (`fixedclipping_mod`); the server adds noise."""


def wrap_strategy(strategy: Strategy, cfg: Config, ledger: PrivacyLedger) -> Strategy:
    """`strategy` inside Flower's DP wrapper for `privacy.clipping`, accounted by `ledger`."""
    cls = ServerSideClipping if cfg.privacy.clipping == "server" else ClientSideClipping
    wrapper = cls(
        strategy,
        noise_multiplier=ledger.client_dp_noise_multiplier,
        clipping_norm=cfg.privacy.clipping_norm,
        num_sampled_clients=sampled_clients(cfg.federation),
    )
    wrapper.ledger = ledger
    return wrapper
