"""SecAgg+'s client half: Flower's legacy NumPyClient around the same Lightning training.

Flower 1.42 has SecAgg+ for its legacy API only (`secaggplus_mod` on the client), so
this client speaks it. It sends its update as a delta from the global model: SecAgg+
clips every coordinate (times the client's weight share) to +-clipping_range before
quantizing it, so small deltas keep the quantization error small where full weights
would lose precision or be clipped. Only floating-point entries travel
(`fl_lightning.models.state_dict`). With client_dp, the client clips its delta to
`privacy.clipping_norm` and sends weight 1; the server adds the noise to the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import NDArrays, Scalar

from fl_lightning.client import training
from fl_lightning.client.handlers import partition
from fl_lightning.config.node_config import node_run_config
from fl_lightning.config.schema import Config
from fl_lightning.models.build import build_model
from fl_lightning.models.state_dict import floating_keys, with_floating
from fl_lightning.vocabulary import (
    ACCOUNTANT_RECORD,
    CLIPPED_METRIC,
    EPSILON_METRIC,
    LR_FACTOR,
    MAX_WEIGHT,
    SERVER_ROUND,
    legacy_loss,
)


class LightningNumPyClient(NumPyClient):
    """A legacy client around `training.fit` / `training.validate`, sending deltas."""

    def __init__(self, cfg: Config, context: Context) -> None:
        self.cfg = cfg
        self.state = context.state
        self.partition = partition(context)

    def _state_dict(self, parameters: NDArrays) -> dict[str, torch.Tensor]:
        # Integer buffers are not sent: they come from a fresh model of the same architecture.
        return with_floating(build_model(self.cfg).state_dict(), parameters)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train on the partition; return the delta from the global model and its weight."""
        state = self._state_dict(parameters)
        accountant = self.state.config_records.get(ACCOUNTANT_RECORD)
        result = training.fit(
            self.cfg,
            state,
            *self.partition,
            server_round=int(cast(int, config[SERVER_ROUND])),
            lr_factor=float(cast(float, config[LR_FACTOR])),
            accountant_state=cast(str, accountant["state"]) if accountant else None,
        )
        assert result.state_dict is not None
        if result.accountant_state is not None:
            self.state[ACCOUNTANT_RECORD] = ConfigRecord({"state": result.accountant_state})
        delta = [
            (result.state_dict[k].numpy() - p).astype(p.dtype)
            for k, p in zip(floating_keys(state), parameters, strict=True)
        ]
        weight = result.num_examples
        if self.cfg.privacy.mode == "client_dp":
            from flwr.supercore.differential_privacy import clip_inputs_inplace

            clip_inputs_inplace(delta, self.cfg.privacy.clipping_norm)
            weight = 1  # the noise is calibrated to an unweighted mean
        # What the server sees in the clear: only what it needs, so no training metrics.
        metrics: dict[str, Scalar] = {CLIPPED_METRIC: self._clipped(delta, weight, config)}
        if self.cfg.privacy.mode == "dp_sgd":  # the server's ledger: epsilon per client
            metrics[EPSILON_METRIC] = result.metrics[EPSILON_METRIC]
        return delta, weight, metrics

    def _clipped(self, delta: NDArrays, weight: int, config: dict[str, Scalar]) -> int:
        """Coordinates SecAgg+ will clip: |delta| * weight / max_weight > clipping_range."""
        a = self.cfg.secure_aggregation
        bound = a.clipping_range * float(cast(float, config[MAX_WEIGHT])) / weight
        return int(sum(int((np.abs(d) > bound).sum()) for d in delta))

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Validate the global model on the partition's held-out samples."""
        result = training.validate(self.cfg, self._state_dict(parameters), *self.partition)
        return legacy_loss(result.metrics), result.num_examples, dict(result.metrics)


def make_secure_client_app(cfg: Config | None, extra_mods: Sequence[Mod] = ()) -> ClientApp:
    """The legacy ClientApp SecAgg+ talks to; `extra_mods` run first (tests inject dropouts)."""

    def client_fn(context: Context) -> Client:
        config = node_run_config(cfg, context.run_config, context.node_config)
        return LightningNumPyClient(config, context).to_client()

    return ClientApp(client_fn=client_fn, mods=[*extra_mods, secaggplus_mod])
