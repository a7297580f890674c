"""Secure aggregation with Flower's SecAgg+: the server learns only the sum of the updates.

Flower 1.41 has SecAgg+ for its legacy API only (`SecAggPlusWorkflow` on the server,
`secaggplus_mod` on the client), so this module adapts the same Lightning training
(`training.fit`), centralized evaluation and round log (`RoundRecorder`) to it:

- Updates travel as deltas from the global model: SecAgg+ clips every coordinate (times
  the client's weight share) to +-clipping_range before quantizing it, so small deltas
  keep the quantization error small where full weights would lose precision or be clipped.
- Only floating-point entries of the state dict are summed. Integer buffers (BatchNorm's
  `num_batches_tracked`) stay out: SecAgg+ returns floats and mis-restores 0-d arrays.
  Clients keep their own counters (they only matter for BatchNorm with momentum=None).
- With client_dp, clients clip their delta to `privacy.clipping_norm` and send weight 1;
  Flower's legacy `DifferentialPrivacyClientSideFixedClipping` adds the noise to the sum.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fl_lightning.checks import is_int, is_number
from fl_lightning.config import Config, sampled_clients
from fl_lightning.dp_randomness import add_gaussian_noise, numpy_generator
from fl_lightning.errors import FlLightningError, SecureAggregationError
from fl_lightning.metric_means import plausible
from fl_lightning.node_config import apply_node_config, config_from_run_config
from fl_lightning.rounds import RoundRecorder, round_lr_factor
from fl_lightning.vocabulary import (
    EPSILON_METRIC,
    LR_FACTOR,
    MAX_METRIC_NAME,
    MAX_METRICS,
    RESERVED_METRICS,
    SERVER_ROUND,
)

if TYPE_CHECKING:  # opacus loads only for runs with differential privacy
    from fl_lightning.privacy_ledger import PrivacyLedger

log = logging.getLogger(__name__)

# Fit-metric counting coordinates SecAgg+ would clip (should stay 0: raise clipping_range).
CLIPPED_KEY = "secure_aggregation/clipped"


def secure_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The state-dict entries that go through the secure sum: the floating-point ones."""
    return [key for key, value in state.items() if value.is_floating_point()]


def max_weight(cfg: Config, partition_sizes: Sequence[int]) -> float:
    """SecAgg+'s `max_weight`: the configured one, or the largest client's weight."""
    if cfg.secure_aggregation.max_weight is not None:
        return cfg.secure_aggregation.max_weight
    return 1.0 if cfg.privacy.mode == "client_dp" else float(max(partition_sizes))


# --- client ---------------------------------------------------------------------------


class LightningNumPyClient(NumPyClient):
    """A legacy client around `training.fit` / `training.validate`, sending deltas."""

    def __init__(self, cfg: Config, context: Context) -> None:
        self.cfg = cfg
        self.state = context.state
        self.partition = (
            int(context.node_config["partition-id"]),
            int(context.node_config["num-partitions"]),
        )

    def _state_dict(self, parameters: NDArrays) -> tuple[list[str], dict[str, torch.Tensor]]:
        from fl_lightning.models import build_model

        # Integer buffers are not sent: they come from a fresh model of the same architecture.
        state = build_model(self.cfg).state_dict()
        keys = secure_keys(state)
        state.update(
            {k: torch.from_numpy(np.asarray(p)) for k, p in zip(keys, parameters, strict=True)}
        )
        return keys, state

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train on the partition; return the delta from the global model and its weight."""
        from fl_lightning import training
        from fl_lightning.vocabulary import ACCOUNTANT_RECORD

        keys, state = self._state_dict(parameters)
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
            for k, p in zip(keys, parameters, strict=True)
        ]
        weight = result.num_examples
        if self.cfg.privacy.mode == "client_dp":
            from flwr.supercore.differential_privacy import clip_inputs_inplace

            clip_inputs_inplace(delta, self.cfg.privacy.clipping_norm)
            weight = 1  # the noise is calibrated to an unweighted mean
        # What the server sees in the clear: only what it needs, so no training metrics.
        metrics: dict[str, Scalar] = {CLIPPED_KEY: self._clipped(delta, weight, config)}
        if self.cfg.privacy.mode == "dp_sgd":  # the server's ledger: epsilon per client
            metrics[EPSILON_METRIC] = result.metrics[EPSILON_METRIC]
        return delta, weight, metrics

    def _clipped(self, delta: NDArrays, weight: int, config: dict[str, Scalar]) -> int:
        """Coordinates SecAgg+ will clip: |delta| * weight / max_weight > clipping_range."""
        a = self.cfg.secure_aggregation
        bound = a.clipping_range * float(cast(float, config["max-weight"])) / weight
        return int(sum(int((np.abs(d) > bound).sum()) for d in delta))

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Validate the global model on the partition's held-out samples."""
        from fl_lightning import training

        _, state = self._state_dict(parameters)
        result = training.validate(self.cfg, state, *self.partition)
        return _loss(result.metrics), result.num_examples, dict(result.metrics)


def make_secure_client_app(cfg: Config | None, extra_mods: Sequence[Mod] = ()) -> ClientApp:
    """The legacy ClientApp SecAgg+ talks to; `extra_mods` run first (tests inject dropouts)."""

    def client_fn(context: Context) -> Client:
        config = cfg or config_from_run_config(context.run_config)
        return LightningNumPyClient(
            apply_node_config(config, context.node_config), context
        ).to_client()

    return ClientApp(client_fn=client_fn, mods=[*extra_mods, secaggplus_mod])


# --- server ---------------------------------------------------------------------------


class SecureFedAvg(FedAvg):
    """Legacy FedAvg over deltas whose rounds end like every other strategy's (RoundRecorder).

    Under SecAgg+, every surviving result carries the same securely aggregated vector, so
    FedAvg's weighted mean returns it unchanged; this adds it to the global model.
    """

    def __init__(
        self,
        cfg: Config,
        recorder: RoundRecorder,
        initial: dict[str, torch.Tensor],
        max_weight: float,
        nodes: Mapping[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.keys = secure_keys(initial)
        self.nodes = dict(nodes or {})  # node id -> partition, from the census
        self.template = initial
        self.cfg = cfg
        self.recorder = recorder
        self.max_weight = max_weight
        self._global: NDArrays = []
        self._pending: dict[str, torch.Tensor] | None = None
        super().__init__(
            initial_parameters=ndarrays_to_parameters([initial[k].numpy() for k in self.keys]),
            on_fit_config_fn=self._fit_config,
            fit_metrics_aggregation_fn=_weighted_mean,
            evaluate_metrics_aggregation_fn=_weighted_mean,
            **kwargs,
        )

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        factor = round_lr_factor(self.cfg.optimizer, server_round)
        return {SERVER_ROUND: server_round, LR_FACTOR: factor, "max-weight": self.max_weight}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        """Sample the census's clients within their privacy budget, start the round's clock,
        remember the global model."""
        bound = sorted(self.nodes.values())
        ledger = self.recorder.ledger
        allowed = set(bound if ledger is None else ledger.within_budget(server_round, bound))
        self.recorder.start()
        self._global = parameters_to_ndarrays(parameters)
        proxies = self._sample(client_manager, allowed, self.fraction_fit)
        if ledger is not None and self.cfg.privacy.mode == "dp_sgd":
            ledger.record_sampled(self.nodes[_node_id(proxy)] for proxy in proxies)
        fit = FitIns(parameters, self._fit_config(server_round))
        return [(proxy, fit) for proxy in proxies]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        """Sample the census's clients for federated evaluation."""
        if self.fraction_evaluate == 0.0:
            return []
        proxies = self._sample(client_manager, set(self.nodes.values()), self.fraction_evaluate)
        evaluate = EvaluateIns(parameters, {})
        return [(proxy, evaluate) for proxy in proxies]

    def _sample(
        self, client_manager: ClientManager, partitions: set[int], fraction: float
    ) -> list[ClientProxy]:
        """A share `fraction` of the nodes the census bound to `partitions` (as the Message
        API's strategies sample, `fl_lightning.sampling`): nobody else is sent a message."""
        eligible = {node for node, partition in self.nodes.items() if partition in partitions}
        size = max(int(len(eligible) * fraction), 1)
        return client_manager.sample(size, len(eligible), _AmongNodes(eligible))

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The global model plus the (securely) aggregated delta, in the model's dtypes."""
        self.recorder.lap("client_training")  # the whole SecAgg+ protocol
        if failures:
            log.warning(
                "round %d: %d failure(s) during secure aggregation", server_round, len(failures)
            )
        self.recorder.count(skipped=0)
        if self.recorder.ledger is not None and self.cfg.privacy.mode == "dp_sgd":
            _credit_epsilons(self.recorder.ledger, results, self.nodes)
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        if aggregated is None:
            self.recorder.skip("no client's update reached the secure sum", server_round)
            return None, metrics
        delta = parameters_to_ndarrays(aggregated)
        if not all(np.isfinite(d).all() for d in delta):
            self.recorder.skip("the secure sum is not finite", server_round)
            return None, metrics
        updated = [(g + d).astype(g.dtype) for g, d in zip(self._global, delta, strict=True)]
        clipped = sum(_count(r.metrics.get(CLIPPED_KEY)) for _, r in results)
        self.recorder.add({CLIPPED_KEY: float(clipped)})
        if self.cfg.privacy.mode != "client_dp":  # there: after the noise (the wrapper)
            problem = self.recorder.adoption_problem(self.state_dict(updated))
            if problem is not None:
                self.recorder.skip(f"the new model is not adopted: {problem}", server_round)
                return None, metrics
        self.recorder.lap("aggregation")
        return ndarrays_to_parameters(updated), metrics

    def state_dict(self, arrays: NDArrays) -> dict[str, torch.Tensor]:
        """The model's state dict with `arrays` as its floating-point entries."""
        state = dict(self.template)
        state.update(
            {k: torch.from_numpy(np.asarray(a)) for k, a in zip(self.keys, arrays, strict=True)}
        )
        return state

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Centralized evaluation; the round is logged after the federated evaluation."""
        state = self.state_dict(parameters_to_ndarrays(parameters))
        if server_round == 0:
            self.recorder.start()
        if server_round == 0 or self.fraction_evaluate == 0:
            metrics = self.recorder.close(server_round, state)
            return _loss(metrics), dict(metrics)
        self._pending = state
        return None

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Keep the clients' validation means (the distributed metrics), then close the round."""
        self.recorder.lap("client_evaluation")
        usable = _usable_evaluations(results)
        self.recorder.count(failures=len(failures), rejected=len(results) - len(usable))
        loss, metrics = super().aggregate_evaluate(server_round, usable, failures)
        self.recorder.add(
            {k: float(v) for k, v in metrics.items() if k not in RESERVED_METRICS},
            source="distributed",
        )
        if self._pending is not None:
            self.recorder.close(server_round, self._pending)
            self._pending = None
        return loss, metrics


class _AccountedClientSideClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's legacy client-side-clipping DP wrapper: fixed denominator, secret noise.

    As `client_dp`'s wrapper: the release is the secure sum of the m clipped updates over
    the n clients sampled (a client that silently dropped out of SecAgg+ counts as a zero
    update), plus noise of std `noise_multiplier * clipping_norm / n` drawn from a secret
    generator (`dp_randomness`), so its sensitivity to one client is the ledger's
    whoever replied. A round in which a client reported an error releases nothing (as in
    Flower's wrapper).
    """

    ledger: Any
    cfg: Config
    strategy: SecureFedAvg

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate, add noise calibrated to the updates summed, account for the release."""
        if failures or not results:  # as Flower's wrapper: a round with failures releases nothing
            self.strategy.recorder.lap("client_training")
            self.strategy.recorder.skip("a client failed in secure aggregation", server_round)
            return None, {}
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        share = len(results) / self.num_sampled_clients  # the mean of m, as a sum over n
        arrays = [
            np.asarray(g + share * (a - g), dtype=a.dtype)
            for a, g in zip(parameters_to_ndarrays(parameters), self.strategy._global, strict=True)
        ]
        std = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
        rng = numpy_generator(self.cfg.privacy, self.cfg.seed, server_round)
        add_gaussian_noise(arrays, std, rng)
        self.ledger.record_release()
        problem = self.strategy.recorder.adoption_problem(self.strategy.state_dict(arrays))
        if problem is not None:  # a test of the release: post-processing
            self.strategy.recorder.skip(f"the new model is not adopted: {problem}", server_round)
            return None, metrics
        return ndarrays_to_parameters(arrays), metrics


def _count(value: object) -> int:
    """A positive integer a client reported, or 0 for anything else (hostile input)."""
    return int(value) if is_int(value) and value > 0 else 0  # type: ignore[operator, call-overload]


def _credit_epsilons(
    ledger: PrivacyLedger, results: list[tuple[ClientProxy, FitRes]], nodes: Mapping[int, int]
) -> None:
    """DP-SGD: credit each reported epsilon that the client's plan explains to its census
    partition (the ledger's own figure is logged either way).

    An update already in the secure sum cannot be taken out again: a report the plan does
    not explain is said and left out of the ledger.
    """
    for proxy, res in results:
        partition = nodes.get(_node_id(proxy))
        if partition is None:
            continue
        rounds = ledger.verified_rounds(partition, res.metrics.get(EPSILON_METRIC), None)
        if isinstance(rounds, str):
            log.warning("the privacy report of client %s is ignored: %s", partition, rounds)
        else:
            ledger.record_trained(partition, rounds)


class _AmongNodes(Criterion):
    """Legacy sampling's criterion: only these node ids."""

    def __init__(self, nodes: set[int]) -> None:
        self.nodes = nodes

    def select(self, client: ClientProxy) -> bool:
        """Whether `client` is one of the nodes."""
        return _node_id(client) in self.nodes


def _node_id(proxy: ClientProxy) -> int:
    """The node a legacy client proxy stands for (-1 if it names none)."""
    return int(getattr(proxy, "node_id", -1))


def _usable_evaluations(results: list[tuple[ClientProxy, EvaluateRes]]) -> list:
    """The evaluation results that are numbers a mean can use: a positive integer weight,
    a finite loss, and at most MAX_METRICS metrics, all finite numbers (replies outside
    the secure sum)."""
    return [
        (proxy, res)
        for proxy, res in results
        if _count(res.num_examples) > 0
        and is_number(res.loss)
        and len(res.metrics) <= MAX_METRICS
        and all(is_number(v) for v in res.metrics.values())
        and all(len(k) <= MAX_METRIC_NAME and k.isprintable() for k in res.metrics)
    ]


def _loss(metrics: dict[str, float]) -> float:
    """The loss Flower's legacy API wants with an evaluation: the first logged `*loss*`."""
    return next((float(v) for k, v in metrics.items() if "loss" in k), 0.0)


def _weighted_mean(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of the clients' metrics, over the well-formed reports only.

    Evaluation replies are outside the secure sum and come from clients: a report with a
    weight that is not a positive integer, or a non-finite or non-numeric value, is skipped,
    and a value the others make implausible is left out of its mean (`metric_means`).
    """
    usable = [(n, m) for n, m in results if _count(n) > 0 and all(is_number(v) for v in m.values())]
    # Only names most reports carry: a client cannot write names of its own into the logs.
    counts = Counter(k for _, m in usable for k in m)
    means: dict[str, Scalar] = {}
    for key in sorted(k for k, n in counts.items() if 2 * n > len(usable)):
        pairs = [(n, float(cast(float, m[key]))) for n, m in usable if key in m]
        # As the Message API's strategies do: no one client runs away with it (metric_means).
        kept = [p for p, ok in zip(pairs, plausible([v for _, v in pairs]), strict=True) if ok]
        means[key] = sum(n * v for n, v in kept) / sum(n for n, _ in kept)
    return means


def run_secure_rounds(
    grid: Grid,
    context: Context,
    cfg: Config,
    recorder: RoundRecorder,
    initial: ArrayRecord,
    partition_sizes: Sequence[int],
    nodes: Mapping[int, int],
) -> dict[str, torch.Tensor]:
    """Run the rounds through Flower's SecAgg+ workflow; return the final global state dict.

    `nodes` binds each node id to its partition (the census). Flower's SecAgg+ cannot
    leave one client out mid-protocol: a protocol message it cannot parse ends the run,
    with one line.
    """
    fed, a = cfg.federation, cfg.secure_aggregation
    fraction_evaluate = fed.fraction_evaluate if cfg.data.val_fraction > 0 else 0.0
    weight = max_weight(cfg, partition_sizes)
    secure = SecureFedAvg(
        cfg,
        recorder,
        initial.to_torch_state_dict(),
        weight,
        nodes,
        fraction_fit=fed.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_fit_clients=sampled_clients(fed),
        min_evaluate_clients=1,
        min_available_clients=fed.num_clients,
    )
    strategy: FedAvg | DifferentialPrivacyClientSideFixedClipping = secure
    if cfg.privacy.mode == "client_dp":
        assert recorder.ledger is not None
        wrapper = _AccountedClientSideClipping(
            secure,
            noise_multiplier=recorder.ledger.client_dp_noise_multiplier,
            clipping_norm=cfg.privacy.clipping_norm,
            num_sampled_clients=sampled_clients(fed),
        )
        wrapper.ledger = recorder.ledger
        wrapper.cfg = cfg
        strategy = wrapper
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=fed.num_rounds, round_timeout=fed.round_timeout),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=a.num_shares,
            reconstruction_threshold=a.reconstruction_threshold,
            max_weight=weight,
            clipping_range=a.clipping_range,
            quantization_range=a.quantization_range,
            timeout=fed.round_timeout,
        )
    )
    try:
        workflow(grid, legacy)
    except FlLightningError:
        raise  # ours (the privacy budget, a failed round close): already one line
    except Exception as error:  # Flower parsing a client's protocol message, mid-protocol
        raise SecureAggregationError(
            f"secure aggregation stopped: {type(error).__name__}: {str(error)[:200]}; a "
            "client's SecAgg+ message was malformed or the protocol failed, and SecAgg+ "
            "cannot leave one client out mid-protocol (--verbose shows Flower's logs)"
        ) from None
    # DefaultWorkflow keeps the current global model in its state's "parameters" record.
    return secure.state_dict(legacy.state.array_records["parameters"].to_numpy_ndarrays())
