"""Flower's strategies (Message API), each extended to evaluate centrally and log every round."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from logging import WARNING
from typing import Any, cast

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

from fl_lightning.census import Census
from fl_lightning.config import BATCHNORM_STATISTICS, Config
from fl_lightning.replies import BATCHNORM, EVALUATE, TRAIN, ReplyScreen, weights
from fl_lightning.replies import partition_of as _partition_of
from fl_lightning.rounds import RoundRecorder, round_lr_factor
from fl_lightning.vocabulary import (
    ACCOUNTANT_RECORD,
    BATCHNORM_ACTION,
    EPSILON_METRIC,
    LR_FACTOR,
    RESERVED_METRICS,
    SERVER_ROUND,
    UNIFORM_WEIGHT,
)

BATCHNORM_MESSAGE_TYPE = f"{MessageType.QUERY}.{BATCHNORM_ACTION}"
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
    their example-weighted means are the round's training and distributed metrics, under
    the module's names. Every reply is screened against the run's `census` before any of it
    is used; failed replies and bad ones are counted and left out (`fl_lightning.replies`),
    and an aggregate that is not finite is refused. Client sampling is reproducible, and
    `round_offset` lets a resumed run continue its round numbers. The other strategies
    below inherit all of this.
    """

    def __init__(
        self,
        cfg: Config,
        recorder: RoundRecorder,
        census: Census,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.recorder = recorder
        self.census = census
        self.screen = ReplyScreen(cfg, census)
        self._global: ArrayRecord | None = None
        self._grid: Grid | None = None
        # screen_train's verdicts this round, by id() of the reply (held, so ids stay unique):
        # the partition of a usable reply, None for a refused one.
        self._train_round: int | None = None
        self._train_seen: dict[int, tuple[Message, int | None]] = {}
        self._train_partitions: set[int] = set()
        self.rounds_adopted = 0  # rounds whose aggregate became the global model
        # Rounds already completed by the run this one resumes: Flower counts from 1 again.
        self.round_offset = 0
        self._sent = {"train": 0, "evaluate": 0}  # messages sent this round
        # DP-SGD: each client's accountant (JSON) as last reported, kept for --resume.
        self.accountants: dict[int, str] = {}
        self.resent_accountants = False

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients for training, set the round's lr and start the round's clock.

        Raises PrivacyBudgetExceeded, before any client trains, if the round would take a
        client past `privacy.max_epsilon`.
        """
        server_round += self.round_offset
        if self.recorder.ledger is not None:
            self.recorder.ledger.check_next_round(server_round)
        self.recorder.start()
        self._global = arrays
        self._train_round, self._train_seen, self._train_partitions = None, {}, set()
        self._grid = grid  # strategy.batchnorm=recompute messages the round's clients again
        config[LR_FACTOR] = round_lr_factor(self.cfg.optimizer, server_round)
        with self._sampling(grid, server_round, "train") as ordered:
            messages = list(super().configure_train(server_round, arrays, config, ordered))
        if self.resent_accountants:
            messages = [self._with_own_accountant(message) for message in messages]
        self._sent["train"] = len(messages)
        return messages

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
        with self._sampling(grid, server_round, "evaluate") as ordered:
            messages = list(super().configure_evaluate(server_round, arrays, config, ordered))
        self._sent["evaluate"] = len(messages)
        return messages

    @contextlib.contextmanager
    def _sampling(self, grid: Grid, server_round: int, stage: str) -> Iterator[Grid]:
        """Make Flower's client sampling depend on (seed, round, stage) alone.

        Flower draws `random.sample` from Python's global RNG over node ids that are random
        per run; the same seed would sample other partitions in every run, and a resumed run
        others than the run it continues. With partial participation, nodes are put in
        partition order (the census's) and the draw is seeded; the
        global RNG is restored afterwards.
        """
        f = self.cfg.federation
        if f.fraction_train == 1.0 and f.fraction_evaluate in (0.0, 1.0):
            yield grid  # everybody takes part: nothing to reproduce
            return
        state = random.getstate()
        random.seed(f"{self.cfg.seed}/{server_round}/{stage}")
        try:
            yield cast(Grid, _PartitionOrderedGrid(grid, self.census.nodes))
        finally:
            random.setstate(state)

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The round's usable train replies, in partition order; failures and rejections counted.

        Idempotent within a round: the client-level DP wrapper screens the raw replies
        before it clips them, then this strategy's `aggregate_train` screens the screened
        list again; a reply seen before keeps its verdict and is not counted twice.
        """
        replies = list(replies)
        if self._train_round != server_round:
            self._train_round, self._train_seen, self._train_partitions = server_round, {}, set()
            self.recorder.lap("client_training")  # sending, training, receiving
            # Clients that never replied (round_timeout, dropped out) failed too.
            self.recorder.count(failures=max(0, self._sent["train"] - len(replies)), rejected=0)
        new = [reply for reply in replies if id(reply) not in self._train_seen]
        screened = self.screen.screen(new, TRAIN, self._global, taken=self._train_partitions)
        self.recorder.count(failures=screened.failures, rejected=screened.rejected)
        usable = {id(reply) for reply in screened.valid}
        for reply in new:
            partition = _partition_of(reply) if id(reply) in usable else None
            self._train_seen[id(reply)] = (reply, partition)
        verdicts = [self._train_seen[id(reply)][1] for reply in replies]
        kept = [(p, reply) for p, reply in zip(verdicts, replies, strict=True) if p is not None]
        return [reply for _, reply in sorted(kept, key=lambda pair: pair[0])]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, aggregate, restore the model's dtypes, refuse a non-finite aggregate, and
        keep the train metrics for the round's log."""
        replies = self.screen_train(server_round, replies)
        server_round += self.round_offset
        self.accountants.update(_accountant_states(replies))
        ledger = self.recorder.ledger
        if ledger is not None and self.cfg.privacy.mode == "dp_sgd":
            ledger.record_dp_sgd(_client_epsilons(replies))
        needed = self.cfg.federation.min_train_clients
        if len(replies) < needed:
            return self._skip(
                f"{len(replies)} usable updates, federation.min_train_clients is {needed}",
                server_round,
            )
        saved = {name: getattr(self, name, None) for name in _SERVER_OPTIMIZER_STATE}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self._global is not None:
            arrays = restore_dtypes(arrays, self._global)
        if arrays is not None and not _finite(arrays):
            for name, value in saved.items():
                if hasattr(self, name):
                    setattr(self, name, value)
            return self._skip("the aggregate of the usable updates is not finite", server_round)
        if arrays is not None and self.cfg.strategy.batchnorm == "recompute":
            self.recorder.lap("aggregation")
            nodes = [reply.metadata.src_node_id for reply in replies]
            arrays = self._recompute_batchnorm(server_round, arrays, nodes)
            self.recorder.lap("batchnorm_statistics")
        if metrics is not None:
            self.recorder.add(module_metrics(metrics), source="train")
        self._log_clients(replies)
        self.rounds_adopted += arrays is not None
        self.recorder.lap("aggregation")
        return arrays, metrics

    def _log_clients(self, replies: list[Message]) -> None:
        """Each client's own metrics (not under differential privacy: they are not covered)."""
        if self.cfg.privacy.mode == "none":
            self.recorder.add_clients(_per_client(replies))

    def _skip(self, why: str, server_round: int) -> tuple[None, None]:
        """Leave the global model as it is this round, saying why."""
        log(WARNING, "round %d skipped: %s; the global model stays as it was", server_round, why)
        self.recorder.lap("aggregation")
        return None, None

    def _recompute_batchnorm(
        self, server_round: int, arrays: ArrayRecord, nodes: list[int]
    ) -> ArrayRecord:
        """`strategy.batchnorm=recompute`: BatchNorm statistics measured on the new model.

        The clients that trained this round run `arrays` over some of their training
        batches; the example-weighted mean of what they measured replaces the average of
        their old running statistics. Failed or unusable replies are counted and left
        out (the same screen as updates); if none is usable the averaged statistics stay.
        """
        keys = [k for k in arrays if k.endswith(BATCHNORM_STATISTICS)]
        if not keys or self._grid is None:
            return arrays
        content = RecordDict(
            {"arrays": arrays, "config": ConfigRecord({SERVER_ROUND: server_round})}
        )
        messages = [
            Message(content, dst_node_id=node, message_type=BATCHNORM_MESSAGE_TYPE)
            for node in nodes
        ]
        replies = list(
            self._grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout)
        )
        reference = ArrayRecord({k: arrays[k] for k in keys})
        screened = self.screen.screen(replies, BATCHNORM, reference=reference)
        missing = max(0, len(messages) - len(replies))
        self.recorder.count(failures=screened.failures + missing, rejected=screened.rejected)
        if not screened.valid:
            log(
                WARNING,
                "round %d: no client measured BatchNorm statistics; the averaged ones stay",
                server_round,
            )
            return arrays
        shares = weights(screened.valid)
        updated = ArrayRecord()
        for key, array in arrays.items():
            if key in keys:
                measured = [r.content.array_records["arrays"][key].numpy() for r in screened.valid]
                mean = sum(w * m for w, m in zip(shares, measured, strict=True))
                array = Array(np.asarray(mean, dtype=array.numpy().dtype))
            updated[key] = array
        if not _finite(updated):
            log(
                WARNING,
                "round %d: BatchNorm statistics not finite; averaged ones kept",
                server_round,
            )
            return arrays
        return updated

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' validation metrics: the distributed ones."""
        server_round += self.round_offset
        self.recorder.lap("client_evaluation")
        replies = list(replies)
        screened = self.screen.screen(replies, EVALUATE)
        missing = max(0, self._sent["evaluate"] - len(replies))
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


class _PartitionOrderedGrid:
    """A Grid whose node ids come in partition order (what Flower's sampling draws from)."""

    def __init__(self, grid: Grid, partitions: dict[int, int]) -> None:
        self._grid = grid
        self._partitions = partitions

    def get_node_ids(self) -> list[int]:
        """Connected node ids, sorted by partition id (unknown nodes last, by id)."""
        return sorted(
            self._grid.get_node_ids(),
            key=lambda node: (self._partitions.get(node, len(self._partitions)), node),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _accountant_states(replies: list[Message]) -> dict[int, str]:
    """DP-SGD: partition id -> the accountant state each reply carries (if any)."""
    states = {}
    for reply in replies:
        record = reply.content.config_records.get(ACCOUNTANT_RECORD)
        if record is not None:
            states[_screened_partition(reply)] = str(record["state"])
    return states


def _client_epsilons(replies: list[Message]) -> dict[int, float]:
    """DP-SGD: partition id -> the cumulative epsilon each (screened) reply reports."""
    return {
        _screened_partition(reply): float(reply.content.metric_records["metrics"][EPSILON_METRIC])  # type: ignore[arg-type]
        for reply in replies
    }


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


def _finite(arrays: ArrayRecord) -> bool:
    """Whether every floating-point value of `arrays` is finite."""
    for array in arrays.values():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return False
    return True
