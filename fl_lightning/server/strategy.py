"""Flower's strategies (Message API), each extended to evaluate centrally and log every round."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from fl_lightning.config.schema import Config, round_lr_factor
from fl_lightning.server.accountants import with_own_accountants
from fl_lightning.server.batchnorm import recompute_batchnorm
from fl_lightning.server.budget import BudgetGate
from fl_lightning.server.census import Census
from fl_lightning.server.checks import partition_of as _partition_of
from fl_lightning.server.control_variates import moved_control, zero_control
from fl_lightning.server.metric_means import robust_weighted_mean
from fl_lightning.server.reply_screen import EVALUATE, ReplyScreen
from fl_lightning.server.round_close import RoundRecorder
from fl_lightning.server.round_screen import RoundScreen
from fl_lightning.server.sampling import round_sampling
from fl_lightning.server.strategy_state import (
    load_strategy_state,
    optimizer_snapshot,
    restore_snapshot,
    strategy_state,
    unsound_optimizer_state,
)
from fl_lightning.vocabulary import (
    FIT_SECONDS,
    LR_FACTOR,
    RESERVED_METRICS,
    SCAFFOLD_RECORD,
    SETUP_SECONDS,
    UNIFORM_WEIGHT,
)


def restore_dtypes(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Cast aggregated arrays back to the global model's dtypes.

    Weighted averaging turns integer buffers (BatchNorm's `num_batches_tracked`) into
    floats, which `load_state_dict` would truncate: the global model keeps the rounded
    aggregate of the clients' counters, as an integer. Server optimizers (FedAdam, ...)
    compute in float64: the weights go back to float32, or whatever the model uses.
    Entries the clients do not send (personal layers, `strategy.local_parameters`; the
    reply screen lets no other be missing) keep the global model's values.
    """
    restored = ArrayRecord()
    for key, expected in reference.items():  # the model's order
        if key not in aggregated:
            restored[key] = expected
            continue
        array, dtype = aggregated[key], np.dtype(expected.dtype)
        values = array.numpy()
        if values.dtype != dtype:
            if np.issubdtype(dtype, np.integer):
                values = np.rint(values)
            array = Array(np.asarray(values, dtype=dtype))  # asarray: 0-d stays an ndarray
        restored[key] = array
    return restored


class LightningFedAvg(FedAvg):
    """FedAvg whose rounds end with centralized evaluation, a checkpoint and one log record.

    A thin composition, each part in its own module: census sampling (`sampling`) within
    the privacy budget (`budget`), the screens of every reply (`round_screen`,
    `reply_screen`), the BatchNorm recompute (`batchnorm`), the accountant relay after
    --resume (`accountants`) and the round close (`RoundRecorder`). An aggregate is adopted
    only if it and the server optimizer's state are sound; else the round is skipped and
    counted. Flower's other strategies below inherit all of this.
    """

    def __init__(self, cfg: Config, recorder: RoundRecorder, census: Census, **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", robust_weighted_mean)
        kwargs.setdefault("evaluate_metrics_aggr_fn", robust_weighted_mean)
        # Flower waits until this many of the nodes a round may sample are connected: those
        # are the census's (within the privacy budget), not a fixed number (`sampling`).
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**kwargs)
        self.cfg = cfg
        self.recorder = recorder
        self.census = census
        self.screen = ReplyScreen(cfg, census)
        self.updates = RoundScreen(cfg, self.screen, recorder)
        self.budget = BudgetGate(recorder)
        self._global: ArrayRecord | None = None
        self._grid: Grid | None = None
        self.rounds_adopted = 0  # rounds whose aggregate became the global model
        self._evaluations_sent = 0  # messages sent this round
        self.resent_accountants = False

    @property
    def accountants(self) -> dict[int, str]:
        """DP-SGD: each client's accountant (JSON) as last verified (`RoundScreen`), kept for
        --resume and sent back to its client after one."""
        return self.updates.accountants

    @accountants.setter
    def accountants(self, value: dict[int, str]) -> None:
        self.updates.accountants = value

    def state_dict(self) -> dict[str, Any]:
        """The strategy's cross-round state as tensors and plain data (`strategy_state`):
        the server optimizer's moments or momentum, the DP-SGD clients' accountants."""
        return strategy_state(self)

    def load_state_dict(self, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        """Continue from `state_dict()`; `weights` are the global model's (shapes, order)."""
        load_strategy_state(self, state, weights, self.cfg.federation.num_clients)
        self.resent_accountants = bool(self.accountants)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients within their privacy budget, set the round's lr, start its clock."""
        allowed = self.budget.allowed(server_round, self.census.nodes.values())
        self.recorder.start()
        self._global = arrays
        self._grid = grid  # strategy.batchnorm=recompute messages the round's clients again
        config[LR_FACTOR] = round_lr_factor(self.cfg.optimizer, server_round)
        nodes = self.census.nodes
        with round_sampling(grid, self.cfg, nodes, server_round, "train", allowed) as view:
            messages = list(super().configure_train(server_round, arrays, config, view))
        self.budget.record_sampled(nodes[m.metadata.dst_node_id] for m in messages)
        if self.resent_accountants:
            messages = with_own_accountants(messages, self.census.nodes, self.accountants)
        self.updates.start(arrays, sent=len(messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients for federated evaluation, reproducibly (`round_sampling`)."""
        with round_sampling(grid, self.cfg, self.census.nodes, server_round, "evaluate") as view:
            messages = list(super().configure_evaluate(server_round, arrays, config, view))
        self._evaluations_sent = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, aggregate, restore the model's dtypes, and adopt the result only if it
        (and the server optimizer's state) is sound; keep the train metrics for the log."""
        replies = self.updates.train(server_round, replies)  # `RoundScreen`
        needed = self.cfg.federation.min_train_clients
        if len(replies) < needed:
            why = f"{len(replies)} usable updates, federation.min_train_clients is {needed}"
            return _skip(self.recorder, why, server_round)
        seconds = take_client_seconds(replies)
        snapshot = optimizer_snapshot(self)
        arrays, metrics = super().aggregate_train(server_round, replies)
        problem = "Flower aggregated nothing" if arrays is None else None
        if arrays is not None:
            assert self._global is not None
            arrays = restore_dtypes(arrays, self._global)
            problem = _not_finite(arrays, "the aggregate") or unsound_optimizer_state(self)
        if problem is None and self.cfg.strategy.batchnorm == "recompute":
            assert self._grid is not None and arrays is not None
            arrays = recompute_batchnorm(self._grid, arrays, replies, server_round, self.updates)
        if problem is None and self.cfg.privacy.mode != "client_dp":  # there: after the noise
            problem = self.recorder.adoption_problem(arrays.to_torch_state_dict())  # type: ignore[union-attr]
        if problem is not None:
            restore_snapshot(self, snapshot)
            return _skip(self.recorder, problem, server_round)
        if metrics is not None:
            self.recorder.add(module_metrics(metrics), source="train")
        _log_clients(self.recorder, self.cfg, replies)
        self.recorder.add(seconds)
        self.rounds_adopted += 1
        self.recorder.lap("aggregation")
        return arrays, metrics

    def refuse_adopted(self, problem: str, server_round: int) -> tuple[None, None]:
        """Take back this round's adoption (client_dp: the noised release failed its test)."""
        self.rounds_adopted -= 1
        self.recorder.sourced.pop("train", None)  # a round not adopted logs no training
        return _skip(self.recorder, problem, server_round)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' validation metrics: the distributed ones."""
        self.recorder.lap("client_evaluation")
        replies = list(replies)
        screened = self.screen.screen(replies, EVALUATE)
        missing = max(0, self._evaluations_sent - len(replies))
        self.recorder.count(failures=screened.failures + missing, rejected=screened.rejected)
        if not screened.valid:
            return None
        metrics = super().aggregate_evaluate(server_round, screened.valid)
        if metrics is not None:
            self.recorder.add(module_metrics(metrics), source="distributed")
        _log_clients(self.recorder, self.cfg, screened.valid)
        return metrics

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's `evaluate_fn`: the round's close (test split, checkpoint, record); rounds
        before the last close in the background, their metrics go only to the run's logs."""
        if server_round == 0:
            self.recorder.start()
        resumable = (self.state_dict(), self.screen.state())
        state_dict = arrays.to_torch_state_dict()
        if server_round < self.cfg.federation.num_rounds:
            # Evaluated while the next round trains, on the cores its clients leave idle.
            self.recorder.close_in_background(server_round, state_dict, resumable)
            return None
        metrics = self.recorder.close(server_round, state_dict, resumable)
        values: dict[str, MetricRecordValues] = dict(metrics)
        return MetricRecord(values)


# The rest of Flower's strategies, with the behaviour above; their own aggregation runs
# first (super() in LightningFedAvg resolves to them), then the dtypes are restored.
class LightningFedProx(LightningFedAvg, FedProx):
    """FedProx: clients add (mu/2)||w - w_global||^2 to their loss (see ImageClassifier)."""


class LightningFedAdam(LightningFedAvg, FedAdam):
    """FedAdam: Adam on the server over the averaged update."""


class LightningFedYogi(LightningFedAvg, FedYogi):
    """FedYogi: Yogi on the server over the averaged update."""


class LightningFedAdagrad(LightningFedAvg, FedAdagrad):
    """FedAdagrad: Adagrad on the server over the averaged update."""


class LightningFedAvgM(LightningFedAvg, FedAvgM):
    """FedAvgM: server momentum over the averaged update."""


class LightningFedMedian(LightningFedAvg, FedMedian):
    """FedMedian: coordinate-wise median of the client models."""


class LightningFedTrimmedAvg(LightningFedAvg, FedTrimmedAvg):
    """FedTrimmedAvg: coordinate-wise mean without the `beta` extremes at each end."""


class LightningKrum(LightningFedAvg, Krum):
    """Krum: the client model closest to its neighbours, robust to `num_malicious_nodes`."""


class LightningScaffold(LightningFedAvg):
    """SCAFFOLD (Karimireddy et al., 2020): FedAvg of the weights, and the server's control
    variate c (`control_variates`) sent with every train message; each client corrects
    its steps by c - c_i (`fl_lightning.client.callbacks.Scaffold`) and replies with the
    change of its c_i, which moves c when the round's aggregate is adopted."""

    def __init__(self, cfg: Config, recorder: RoundRecorder, census: Census, **kwargs: Any) -> None:
        super().__init__(cfg, recorder, census, **kwargs)
        self.control: ArrayRecord | None = None  # kept in resume.pt (`strategy_state`)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's messages, each with c."""
        self.control = self.control or zero_control(arrays)
        self.screen.control = self.control  # what each client's change must match
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content[SCAFFOLD_RECORD] = self.control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the screened replies' weights; c moved by their control changes."""
        usable = self.updates.train(server_round, list(replies))  # screened once a round
        changes = [reply.content.array_records[SCAFFOLD_RECORD] for reply in usable]
        for reply in usable:  # Flower aggregates every array record of a reply
            del reply.content[SCAFFOLD_RECORD]
        arrays, metrics = super().aggregate_train(server_round, usable)
        if arrays is not None and self.control is not None:
            share = len(changes) / self.cfg.federation.num_clients
            self.control = moved_control(self.control, changes, share)
        return arrays, metrics


# The class behind each `strategy.name`: what build_strategy builds, and what decides which
# cross-round state resume.pt keeps (fl_lightning.server.strategy_state).
STRATEGY_CLASSES: dict[str, type[LightningFedAvg]] = {
    "fedavg": LightningFedAvg,
    "fedprox": LightningFedProx,
    "fedadam": LightningFedAdam,
    "fedyogi": LightningFedYogi,
    "fedadagrad": LightningFedAdagrad,
    "fedavgm": LightningFedAvgM,
    "fedmedian": LightningFedMedian,
    "fedtrimmedavg": LightningFedTrimmedAvg,
    "krum": LightningKrum,
    "scaffold": LightningScaffold,
}


def build_strategy(
    cfg: Config, recorder: RoundRecorder, census: Census, **sampling: Any
) -> LightningFedAvg:
    """The strategy named by `strategy.name`, with its own parameters from the config."""
    s = cfg.strategy
    adaptive = {"eta": s.eta, "tau": s.tau}
    moments = {"beta_1": s.beta_1, "beta_2": s.beta_2}
    own: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": s.proximal_mu},
        "fedadam": {**adaptive, **moments},
        "fedyogi": {**adaptive, **moments},
        "fedadagrad": adaptive,
        "fedavgm": {
            "server_learning_rate": s.server_learning_rate,
            "server_momentum": s.server_momentum,
        },
        "fedtrimmedavg": {"beta": s.beta},
        "krum": {"num_malicious_nodes": s.num_malicious_clients},
    }
    params = dict(own.get(s.name, {}))
    if cfg.privacy.mode == "client_dp":
        # DP-FedAvg's noise is calibrated to an unweighted mean of clipped updates.
        params["weighted_by_key"] = UNIFORM_WEIGHT
    cls = STRATEGY_CLASSES[s.name]
    return cls(cfg=cfg, recorder=recorder, census=census, **params, **sampling)


def _log_clients(recorder: RoundRecorder, cfg: Config, replies: list[Message]) -> None:
    """Each client's own metrics (not under differential privacy: they are not covered)."""
    if cfg.privacy.mode == "none":
        recorder.add_clients(_per_client(replies))


def take_client_seconds(replies: list[Message]) -> dict[str, float]:
    """Where a round's clients spent their time, mean over the screened train replies that
    say: `time/clients/setup` (data, model, Trainer) and `time/clients/fit` (`Trainer.fit`).
    They overlap the server's phases (`time/<phase>`, which add up to the round).

    The keys are taken out of the replies: Flower aggregates only records whose metric
    keys agree, and a client may leave them out.
    """
    means = {}
    records = [reply.content.metric_records["metrics"] for reply in replies]
    for name, key in (("setup", SETUP_SECONDS), ("fit", FIT_SECONDS)):
        values = [float(r.pop(key)) for r in records if key in r]  # type: ignore[arg-type]
        if values:
            means[f"time/clients/{name}"] = statistics.fmean(values)
    return means


def _skip(recorder: RoundRecorder, why: str, server_round: int) -> tuple[None, None]:
    """Leave the global model as it is this round (`RoundMetrics.skip`)."""
    recorder.skip(why, server_round)
    return None, None


def module_metrics(metrics: MetricRecord) -> dict[str, float]:
    """The module's own metrics of an aggregated record, under the names it logged them."""
    return {
        key: float(value)  # type: ignore[arg-type]
        for key, value in metrics.items()
        if key not in RESERVED_METRICS
    }


def _per_client(replies: list[Message]) -> dict[int, dict[str, float]]:
    """Each screened reply's module metrics, by partition."""
    return {
        _screened_partition(reply): module_metrics(reply.content.metric_records["metrics"])
        for reply in replies
    }


def _screened_partition(reply: Message) -> int:
    """The partition of a reply the screen accepted (it has one)."""
    partition = _partition_of(reply)
    assert partition is not None, "only screened replies come here"
    return partition


def _not_finite(arrays: ArrayRecord, what: str) -> str | None:
    """Why `arrays` cannot be a model: some floating-point value is NaN or infinite."""
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{what} is not finite ({key})".lstrip()
    return None
