"""Flower's strategies (Message API), each extended to evaluate centrally and log every round."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.common.logger import log
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

from fl_lightning.batchnorm import recompute_batchnorm
from fl_lightning.census import Census
from fl_lightning.checks import partition_of as _partition_of
from fl_lightning.config import Config
from fl_lightning.metric_means import robust_weighted_mean
from fl_lightning.replies import EVALUATE, ReplyScreen
from fl_lightning.round_screen import RoundScreen
from fl_lightning.rounds import RoundRecorder, round_lr_factor
from fl_lightning.sampling import seeded_sampling
from fl_lightning.vocabulary import (
    LR_FACTOR,
    RESERVED_METRICS,
    UNIFORM_WEIGHT,
)

# Attributes Flower's server optimizers (FedAdam, FedYogi, FedAdagrad, FedAvgM) rebind as
# they aggregate: put back when their aggregate is refused, so one bad round does not
# poison the next ones.
_SERVER_OPTIMIZER_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")


def restore_dtypes(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Cast aggregated arrays back to the global model's dtypes.

    Weighted averaging turns integer buffers (BatchNorm's `num_batches_tracked`) into
    floats, which `load_state_dict` would truncate: the global model keeps the rounded
    aggregate of the clients' counters, as an integer. Server optimizers (FedAdam, ...)
    compute in float64: the weights go back to float32, or whatever the model uses.
    """
    restored = ArrayRecord()
    for key, array in aggregated.items():
        dtype = np.dtype(reference[key].dtype)
        values = array.numpy()
        if values.dtype != dtype:
            if np.issubdtype(dtype, np.integer):
                values = np.rint(values)
            array = Array(np.asarray(values, dtype=dtype))  # asarray: 0-d stays an ndarray
        restored[key] = array
    return restored


class LightningFedAvg(FedAvg):
    """FedAvg whose rounds end with centralized evaluation, a checkpoint and one log record.

    Every round it sends clients their learning-rate factor (`optimizer.warmup_rounds`,
    `optimizer.round_decay`). Train and evaluate replies carry the module's own metrics;
    their example-weighted means (`metric_means`) are the round's training and distributed
    metrics, under the module's names. Every reply is screened before any of it is used:
    against the run's `census` (`fl_lightning.replies`), against its DP-SGD plan (the
    privacy ledger) and against the round's other updates (`fl_lightning.update_screen`);
    failed replies and bad ones are counted and left out. A new global model is adopted
    only if it, and the server optimizer's state, are finite and its first test batch
    gives finite metrics; otherwise the round is skipped and counted. Only nodes the census
    bound (and, under DP, within their budget) are sampled, reproducibly; `round_offset`
    lets a resumed run continue its round numbers. The other strategies below inherit all
    of this.
    """

    def __init__(
        self,
        cfg: Config,
        recorder: RoundRecorder,
        census: Census,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", robust_weighted_mean)
        kwargs.setdefault("evaluate_metrics_aggr_fn", robust_weighted_mean)
        # Flower waits until this many of the nodes a round may sample are connected: those
        # are the census's (within the privacy budget), not a fixed number (`_sampling`).
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**kwargs)
        self.cfg = cfg
        self.recorder = recorder
        self.census = census
        self.screen = ReplyScreen(cfg, census)
        self.updates = RoundScreen(cfg, self.screen, recorder)
        self._global: ArrayRecord | None = None
        self._grid: Grid | None = None
        self.rounds_adopted = 0  # rounds whose aggregate became the global model
        # Rounds already completed by the run this one resumes: Flower counts from 1 again.
        self.round_offset = 0
        self._evaluations_sent = 0  # messages sent this round
        self.resent_accountants = False
        self._out_of_budget: set[int] = set()  # partitions said to be past max_epsilon

    @property
    def accountants(self) -> dict[int, str]:
        """DP-SGD: each client's accountant (JSON) as last verified (`RoundScreen`), kept for
        --resume and sent back to its client after one."""
        return self.updates.accountants

    @accountants.setter
    def accountants(self, value: dict[int, str]) -> None:
        self.updates.accountants = value

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients for training, set the round's lr and start the round's clock.

        Under DP, a client whose next round would take it past `privacy.max_epsilon` is
        not sampled; PrivacyBudgetExceeded ends the run, before any client trains, when too
        few clients are left.
        """
        server_round += self.round_offset
        allowed = self._within_budget(server_round)
        self.recorder.start()
        self._global = arrays
        self._grid = grid  # strategy.batchnorm=recompute messages the round's clients again
        config[LR_FACTOR] = round_lr_factor(self.cfg.optimizer, server_round)
        with self._sampling(grid, server_round, "train", allowed) as view:
            messages = list(super().configure_train(server_round, arrays, config, view))
        ledger = self.recorder.ledger
        if ledger is not None and self.cfg.privacy.mode == "dp_sgd":
            ledger.record_sampled(self.census.nodes[m.metadata.dst_node_id] for m in messages)
        if self.resent_accountants:
            messages = [self._with_own_accountant(message) for message in messages]
        self.updates.start(arrays, sent=len(messages))
        return messages

    def _within_budget(self, server_round: int) -> list[int] | None:
        """The partitions the privacy ledger lets train this round (None: no ledger)."""
        ledger = self.recorder.ledger
        if ledger is None:
            return None
        bound = sorted(self.census.nodes.values())
        allowed = ledger.within_budget(server_round, bound)
        for partition in sorted(set(bound) - set(allowed) - self._out_of_budget):
            self._out_of_budget.add(partition)
            self.recorder.tracker.note(
                f"privacy budget: client {partition} takes no further part from round "
                f"{server_round}: another round would take it past privacy.max_epsilon="
                f"{self.cfg.privacy.max_epsilon}"
            )
        return allowed

    def _with_own_accountant(self, message: Message) -> Message:
        """A resumed DP-SGD run: the clients' accountants died with the killed run, so each
        sampled client gets its own back (every round: one first sampled later needs it
        then), and nobody else's (a client's accountant tells its sample rate)."""
        partition = self.census.nodes.get(message.metadata.dst_node_id)
        state = self.accountants.get(partition) if partition is not None else None
        if state is None:
            return message
        content = RecordDict(dict(message.content.items()))
        config = ConfigRecord(dict(message.content.config_records["config"]))
        config[f"accountant-{partition}"] = state
        content["config"] = config
        return Message(
            content, dst_node_id=message.metadata.dst_node_id, message_type=MessageType.TRAIN
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients for federated evaluation, reproducibly (see `_sampling`)."""
        server_round += self.round_offset
        with self._sampling(grid, server_round, "evaluate") as view:
            messages = list(super().configure_evaluate(server_round, arrays, config, view))
        self._evaluations_sent = len(messages)
        return messages

    def _sampling(
        self, grid: Grid, server_round: int, stage: str, allowed: list[int] | None = None
    ) -> contextlib.AbstractContextManager[Grid]:
        """The census's nodes (`allowed` ones only), sampled by (seed, round, stage) alone."""
        f = self.cfg.federation
        partial = not (f.fraction_train == 1.0 and f.fraction_evaluate in (0.0, 1.0))
        key = f"{self.cfg.seed}/{server_round}/{stage}"
        return seeded_sampling(grid, self.census.nodes, key, partial, allowed)

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The round's usable train replies, in partition order (`RoundScreen.train`)."""
        return self.updates.train(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, aggregate, restore the model's dtypes, and adopt the result only if it
        (and the server optimizer's state) is sound; keep the train metrics for the log."""
        replies = self.screen_train(server_round, replies)
        server_round += self.round_offset
        needed = self.cfg.federation.min_train_clients
        if len(replies) < needed:
            return self._skip(
                f"{len(replies)} usable updates, federation.min_train_clients is {needed}",
                server_round,
            )
        saved = {name: getattr(self, name, None) for name in _SERVER_OPTIMIZER_STATE}
        arrays, metrics = super().aggregate_train(server_round, replies)
        problem = "Flower aggregated nothing" if arrays is None else None
        if arrays is not None:
            assert self._global is not None
            arrays = restore_dtypes(arrays, self._global)
            problem = _not_finite(arrays, "the aggregate") or _unsound_state(self)
        if problem is None and self.cfg.strategy.batchnorm == "recompute":
            arrays = self._recompute_batchnorm(server_round, arrays, replies)  # type: ignore[arg-type]
        if problem is None and self.cfg.privacy.mode != "client_dp":  # there: after the noise
            problem = self.adoption_problem(arrays)  # type: ignore[arg-type]
        if problem is not None:
            for name, value in saved.items():
                if hasattr(self, name):
                    setattr(self, name, value)
            return self._skip(problem, server_round)
        if metrics is not None:
            self.recorder.add(module_metrics(metrics), source="train")
        self._log_clients(replies)
        self.rounds_adopted += 1
        self.recorder.lap("aggregation")
        return arrays, metrics

    def adoption_problem(self, arrays: ArrayRecord) -> str | None:
        """Why `arrays` must not become the global model: its server-side test on one batch
        gives metrics that are not finite (`CentralEvaluator.probe`)."""
        problem = self.recorder.adoption_problem(arrays.to_torch_state_dict())
        return None if problem is None else f"the new model is not adopted: {problem}"

    def refuse_adopted(self, problem: str, server_round: int) -> tuple[None, None]:
        """Take back the adoption of this round's aggregate (client_dp: its noised release
        failed `adoption_problem`)."""
        self.rounds_adopted -= 1
        self.recorder.sourced.pop("train", None)  # a round not adopted logs no training
        return self._skip(problem, server_round + self.round_offset)

    def _log_clients(self, replies: list[Message]) -> None:
        """Each client's own metrics (not under differential privacy: they are not covered)."""
        if self.cfg.privacy.mode == "none":
            self.recorder.add_clients(_per_client(replies))

    def _skip(self, why: str, server_round: int) -> tuple[None, None]:
        """Leave the global model as it is this round (`RoundRecorder.skip`)."""
        self.recorder.skip(why, server_round)
        return None, None

    def _recompute_batchnorm(
        self, server_round: int, arrays: ArrayRecord, replies: list[Message]
    ) -> ArrayRecord:
        """`strategy.batchnorm=recompute`: the round's clients measure the new model's
        BatchNorm statistics (`fl_lightning.batchnorm`); the averaged ones stay if none can."""
        self.recorder.lap("aggregation")
        nodes = [reply.metadata.src_node_id for reply in replies]
        assert self._grid is not None
        arrays, problem = recompute_batchnorm(self._grid, arrays, nodes, server_round, self.updates)
        if problem is not None:
            log(WARNING, "round %d: %s; the averaged ones stay", server_round, problem)
        self.recorder.lap("batchnorm_statistics")
        return arrays

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' validation metrics: the distributed ones."""
        server_round += self.round_offset
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
        self._log_clients(screened.valid)
        return metrics

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Centralized evaluation (Flower's `evaluate_fn`): test split, checkpoint, round record.

        Rounds before the last close in the background (`RoundRecorder.close_in_background`):
        their metrics go to the run's logs, not to the Result Flower's `start` returns.
        """
        if server_round == 0 and self.round_offset:
            return None  # a resumed run: its starting model was evaluated before the kill
        server_round += self.round_offset
        if server_round == 0:
            self.recorder.start()
        if server_round < self.cfg.federation.num_rounds:
            # Evaluated while the next round trains, on the cores its clients leave idle.
            self.recorder.close_in_background(server_round, arrays.to_torch_state_dict())
            return None
        metrics = self.recorder.close(server_round, arrays.to_torch_state_dict())
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


# The class behind each `strategy.name`: what build_strategy builds, and what decides which
# cross-round state resume.pt keeps (fl_lightning.strategy_state).
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


def _unsound_state(strategy: LightningFedAvg) -> str | None:
    """Why the server optimizer's state (FedAdam's moments, FedAvgM's momentum) is unsound."""
    for name in _SERVER_OPTIMIZER_STATE:
        value = getattr(strategy, name, None)
        arrays: list[Any] = []
        if isinstance(value, ArrayRecord):
            arrays = [array.numpy() for array in value.values()]
        elif isinstance(value, dict | list):
            arrays = list(value.values()) if isinstance(value, dict) else value
        if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in arrays):
            return f"the server optimizer's {name} would not be finite"
    return None


def _not_finite(arrays: ArrayRecord, what: str) -> str | None:
    """Why `arrays` cannot be a model: some floating-point value is NaN or infinite."""
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{what} is not finite ({key})".lstrip()
    return None
