"""SecAgg+'s server half: the server learns only the sum of the updates.

Flower 1.42 has SecAgg+ for its legacy API only (`SecAggPlusWorkflow`), so this adapts
the rounds to it, with what every other path uses: the census's nodes, the budget gate,
the learning-rate schedule, the metric means, and the round close (`RoundRecorder`).
Updates arrive as deltas from the global model, over the floating-point entries of the
state dict only (`fl_lightning.models.state_dict`; the clients: `fl_lightning.client.secure`).
With client_dp, Flower's legacy `DifferentialPrivacyClientSideFixedClipping` adds the
noise to the sum.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
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
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fl_lightning.config.schema import Config, round_lr_factor, sample_size, sampled_clients
from fl_lightning.errors import FlLightningError, SecureAggregationError
from fl_lightning.models.state_dict import floating_keys, with_floating
from fl_lightning.privacy.randomness import numpy_generator
from fl_lightning.privacy.release import noised_release
from fl_lightning.seeding import derive
from fl_lightning.server.budget import BudgetGate
from fl_lightning.server.checks import is_int, is_metric_name, is_number
from fl_lightning.server.metric_means import plausible
from fl_lightning.server.round_close import RoundRecorder
from fl_lightning.vocabulary import (
    CLIPPED_METRIC,
    EPSILON_METRIC,
    LR_FACTOR,
    MAX_METRICS,
    MAX_WEIGHT,
    RESERVED_METRICS,
    SERVER_ROUND,
    legacy_loss,
)

if TYPE_CHECKING:  # opacus loads only for runs with differential privacy
    from fl_lightning.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)


def max_weight(cfg: Config, partition_sizes: Sequence[int]) -> float:
    """SecAgg+'s `max_weight`: the configured one, or the largest client's weight."""
    if cfg.secure_aggregation.max_weight is not None:
        return cfg.secure_aggregation.max_weight
    return 1.0 if cfg.privacy.mode == "client_dp" else float(max(partition_sizes))


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
        self.nodes = dict(nodes or {})  # node id -> partition, from the census
        self.template = initial
        self.cfg = cfg
        self.recorder = recorder
        self.budget = BudgetGate(recorder)
        self.max_weight = max_weight
        self.current: NDArrays = []  # the round's global model
        self._pending: dict[str, torch.Tensor] | None = None
        initial_floats = [initial[k].numpy() for k in floating_keys(initial)]
        super().__init__(
            initial_parameters=ndarrays_to_parameters(initial_floats),
            on_fit_config_fn=self._fit_config,
            fit_metrics_aggregation_fn=_weighted_mean,
            evaluate_metrics_aggregation_fn=_weighted_mean,
            **kwargs,
        )

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        factor = round_lr_factor(self.cfg.optimizer, server_round)
        return {SERVER_ROUND: server_round, LR_FACTOR: factor, MAX_WEIGHT: self.max_weight}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        """Sample the census's clients within their privacy budget, start the round's clock,
        remember the global model."""
        allowed = set(self.budget.allowed(server_round, self.nodes.values()))
        self.recorder.start()
        self.current = parameters_to_ndarrays(parameters)
        proxies = _sample(
            client_manager,
            self.nodes,
            allowed,
            self.fraction_fit,
            self.cfg,
            (server_round, "train"),
        )
        self.budget.record_sampled(self.nodes[_node_id(proxy)] for proxy in proxies)
        fit = FitIns(parameters, self._fit_config(server_round))
        return [(proxy, fit) for proxy in proxies]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        """Sample the census's clients for federated evaluation."""
        if self.fraction_evaluate == 0.0:
            return []
        partitions, key = set(self.nodes.values()), (server_round, "evaluate")
        proxies = _sample(
            client_manager, self.nodes, partitions, self.fraction_evaluate, self.cfg, key
        )
        evaluate = EvaluateIns(parameters, {})
        return [(proxy, evaluate) for proxy in proxies]

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
        updated = [(g + d).astype(g.dtype) for g, d in zip(self.current, delta, strict=True)]
        clipped = sum(_count(r.metrics.get(CLIPPED_METRIC)) for _, r in results)
        self.recorder.add({CLIPPED_METRIC: float(clipped)})
        # Under client_dp the release is tested after the noise (the wrapper).
        if self.cfg.privacy.mode != "client_dp" and not self.adopted(updated, server_round):
            return None, metrics
        self.recorder.lap("aggregation")
        return ndarrays_to_parameters(updated), metrics

    def adopted(self, arrays: NDArrays, server_round: int) -> bool:
        """Whether `arrays` may become the global model (`RoundRecorder.adoption_problem`);
        if not, the round is skipped."""
        problem = self.recorder.adoption_problem(self.state_dict(arrays))
        if problem is not None:
            self.recorder.skip(problem, server_round)
        return problem is None

    def state_dict(self, arrays: NDArrays) -> dict[str, torch.Tensor]:
        """The model's state dict with `arrays` as its floating-point entries."""
        return with_floating(self.template, arrays)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Centralized evaluation; the round is logged after the federated evaluation."""
        state = self.state_dict(parameters_to_ndarrays(parameters))
        if server_round == 0:
            self.recorder.start()
        if server_round == 0 or self.fraction_evaluate == 0:
            metrics = self.recorder.close(server_round, state)
            # A round `evaluation.every_n_rounds` leaves out has no centralized point.
            return (legacy_loss(metrics), dict(metrics)) if metrics else None
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


class AccountedClientSideClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's legacy client-side-clipping DP wrapper: fixed denominator, secret noise.

    As `client_dp`'s wrapper: the release (`fl_lightning.privacy.release`) is the secure
    sum of the m clipped updates over the n clients sampled (a client that silently
    dropped out of SecAgg+ counts as a zero update), plus calibrated noise drawn from a
    secret generator. A round in which a client reported an error releases nothing (as in
    Flower's wrapper).
    """

    def __init__(self, strategy: SecureFedAvg, ledger: PrivacyLedger) -> None:
        cfg = strategy.cfg
        super().__init__(
            strategy,
            noise_multiplier=ledger.client_dp_noise_multiplier,
            clipping_norm=cfg.privacy.clipping_norm,
            num_sampled_clients=sampled_clients(cfg.federation),
        )
        self.secure = strategy
        self.ledger = ledger

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate, add noise calibrated to the updates summed, account for the release."""
        secure = self.secure
        if failures or not results:  # as Flower's wrapper: a round with failures releases nothing
            secure.recorder.lap("client_training")
            secure.recorder.skip("a client failed in secure aggregation", server_round)
            return None, {}
        parameters, metrics = secure.aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        arrays = noised_release(
            parameters_to_ndarrays(parameters),
            secure.current,
            len(results),
            self.num_sampled_clients,
            self.noise_multiplier,
            self.clipping_norm,
            numpy_generator(secure.cfg.privacy, secure.cfg.seed, server_round),
        )
        self.ledger.record_release()
        if not secure.adopted(arrays, server_round):  # a test of the release: post-processing
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


def _sample(
    client_manager: ClientManager,
    nodes: Mapping[int, int],
    partitions: set[int],
    fraction: float,
    cfg: Config,
    key: tuple[int, str],
) -> list[ClientProxy]:
    """A share `fraction` of the nodes the census bound to `partitions`, nobody else, drawn
    as the Message API's strategies draw (`fl_lightning.server.sampling`): in partition
    order, seeded by (seed, round, stage), so both paths sample the same partitions."""
    eligible = {node for node, partition in nodes.items() if partition in partitions}
    size = sample_size(len(eligible), fraction)
    client_manager.wait_for(len(eligible), int(cfg.federation.round_timeout))
    proxies = {_node_id(p): p for p in client_manager.all().values()}
    ordered = [proxies[n] for n in sorted(eligible, key=nodes.__getitem__) if n in proxies]
    if len(ordered) < size:
        return []  # as Flower's sampling: not enough of them connected
    server_round, stage = key
    draw = random.Random(derive(cfg.seed, "sampling", stage, server_round))
    return ordered if size == len(ordered) else draw.sample(ordered, size)


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
        and all(map(is_metric_name, res.metrics))
    ]


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
    fraction_evaluate: float,
) -> dict[str, torch.Tensor]:
    """Run the rounds through Flower's SecAgg+ workflow; return the final global state dict.

    `nodes` binds each node id to its partition (the census). Flower's SecAgg+ cannot
    leave one client out mid-protocol: a protocol message it cannot parse ends the run,
    with one line.
    """
    fed, a = cfg.federation, cfg.secure_aggregation
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
    strategy: FedAvg | AccountedClientSideClipping = secure
    if cfg.privacy.mode == "client_dp":
        assert recorder.ledger is not None
        strategy = AccountedClientSideClipping(secure, recorder.ledger)
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
    _run_workflow(workflow, grid, legacy)
    # DefaultWorkflow keeps the current global model in its state's "parameters" record.
    return secure.state_dict(legacy.state.array_records["parameters"].to_numpy_ndarrays())


def _run_workflow(workflow: DefaultWorkflow, grid: Grid, legacy: LegacyContext) -> None:
    """Run SecAgg+; Flower's own errors mid-protocol become one line."""
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
