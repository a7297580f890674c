from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fl_lightning.census import Census
from fl_lightning.config import load_config
from fl_lightning.rounds import RoundRecorder, round_lr_factor
from fl_lightning.strategy import build_strategy, restore_dtypes
from fl_lightning.vocabulary import UNIFORM_WEIGHT
from tests.test_config import MNIST, REPO

STRATEGIES = [
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad",
    "fedavgm", "fedmedian", "fedtrimmedavg", "krum",
]  # fmt: skip


class FakeGrid:
    """The one Grid call sampling makes: which nodes are connected."""

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3, 4, 5]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the process's task identity, which a runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def recorder() -> RoundRecorder:
    """A recorder for strategies whose rounds are aggregated but never closed here."""
    return RoundRecorder(None, None, None)  # type: ignore[arg-type]


def census(clients: int = 5, train: int = 100, val: int = 10) -> Census:
    """What the census of FakeGrid's nodes says: node k holds partition k - 1."""
    return Census(
        clients,
        nodes={k + 1: k for k in range(clients)},
        train_sizes=dict.fromkeys(range(clients), train),
        val_sizes=dict.fromkeys(range(clients), val),
    )


def train_content(
    arrays: ArrayRecord, partition: int, examples: int = 10, loss: float = 1.0
) -> RecordDict:
    """What an honest client's train reply holds."""
    metrics = MetricRecord(
        {"train/loss": loss, "train/accuracy": 0.5, "num-examples": examples, UNIFORM_WEIGHT: 1}
    )
    return RecordDict(
        {"arrays": arrays, "metrics": metrics, "client": ConfigRecord({"partition-id": partition})}
    )


def node_partition(message: Message) -> int:
    """The partition FakeGrid's census binds to the node a message goes to."""
    return message.metadata.dst_node_id - 1


def global_arrays() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros((2, 3), np.float32)), "count": Array(np.array(10, np.int64))}
    )


def reply_to(message: Message, shift: float, counter: int, examples: int) -> Message:
    arrays = ArrayRecord(
        {
            "w": Array(np.full((2, 3), shift, np.float32)),
            "count": Array(np.array(counter, np.int64)),
        }
    )
    content = train_content(arrays, node_partition(message), examples, loss=shift)
    return Message(content=content, reply_to=message)


def test_aggregates_get_the_models_dtypes_back() -> None:
    reference = ArrayRecord(
        {"w": Array(np.zeros(2, np.float32)), "n": Array(np.array(3, np.int64))}
    )
    averaged = ArrayRecord(
        {"w": Array(np.array([0.5, 1.5], np.float64)), "n": Array(np.array(4.6))}
    )
    restored = restore_dtypes(averaged, reference)
    assert restored["n"].numpy().dtype == np.int64 and restored["n"].numpy() == 5
    assert restored["w"].numpy().dtype == np.float32
    np.testing.assert_array_equal(restored["w"].numpy(), [0.5, 1.5])


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_aggregates_and_keeps_the_metric_names(name: str) -> None:
    cfg = load_config(MNIST, [f"strategy.name={name}", "strategy.num_malicious_clients=1"])
    strategy = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    assert len(messages) == 5
    sent = messages[0].content.config_records["config"]
    assert sent["lr-factor"] == pytest.approx(1.0)  # round 1 of a run without round_decay
    if name == "fedprox":
        assert sent["proximal-mu"] == pytest.approx(0.01)
    replies = [reply_to(m, 0.1 * (i + 1), 20 + i, 100) for i, m in enumerate(messages)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    counter = arrays["count"].numpy()
    assert counter.dtype == np.int64 and 10 <= counter <= 24
    weights = arrays["w"].numpy()
    assert weights.dtype == np.float32 and np.isfinite(weights).all()
    loss = strategy.recorder.sourced["train"]["train/loss"]
    if name == "krum":  # Krum reports the metrics of the client it selects
        assert round(loss, 6) in {0.1, 0.2, 0.3, 0.4, 0.5}
    else:
        assert loss == pytest.approx(0.3)  # example-weighted mean of 0.1..0.5
    if name in ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg"):
        np.testing.assert_allclose(weights, 0.3, rtol=1e-6)  # mean == median == trimmed mean here


def test_round_lr_factor_warms_up_across_rounds() -> None:
    cfg = load_config(MNIST, ["optimizer.warmup_rounds=2"])
    factors = [round_lr_factor(cfg.optimizer, r) for r in (1, 2, 3)]
    assert factors == pytest.approx([0.5, 1.0, 1.0])


def test_round_lr_factor_decays_across_rounds() -> None:
    cfg = load_config(MNIST, ["optimizer.round_decay=0.5"])
    assert [round_lr_factor(cfg.optimizer, r) for r in (1, 2, 3)] == pytest.approx([1, 0.5, 0.25])


def test_aggregate_does_not_depend_on_reply_order() -> None:
    cfg = load_config(MNIST)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((50, 50)).astype(np.float32) for _ in range(5)]

    def aggregate(order: list[int]) -> np.ndarray:
        strategy = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
        messages = list(
            strategy.configure_train(
                1,
                ArrayRecord({"w": Array(np.zeros((50, 50), np.float32))}),
                ConfigRecord(),
                FakeGrid(),
            )
        )  # type: ignore[arg-type]
        messages.sort(key=node_partition)
        replies = []
        for client in order:
            arrays = ArrayRecord({"w": Array(weights[client])})
            content = train_content(arrays, client, examples=10 + 7 * client)
            replies.append(Message(content=content, reply_to=messages[client]))
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return arrays["w"].numpy()

    np.testing.assert_array_equal(aggregate([0, 1, 2, 3, 4]), aggregate([4, 2, 0, 3, 1]))


class BatchNormGrid(FakeGrid):
    """Clients 1-3 measure statistics (mean = id, var = 10 x id, 100 x id samples); 4 sends
    NaN, 5 fails."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        self.sent = list(messages)
        replies = []
        for message in self.sent:
            node = message.metadata.dst_node_id
            if node == 5:
                replies.append(Message(Error(0, "RuntimeError: out of memory"), reply_to=message))
                continue
            mean = np.full(2, np.nan if node == 4 else node, np.float32)
            arrays = ArrayRecord(
                {"bn.running_mean": Array(mean), "bn.running_var": Array(10 * mean)}
            )
            metrics = MetricRecord({"num-examples": 100 * node, UNIFORM_WEIGHT: 1})
            content = RecordDict(
                {
                    "arrays": arrays,
                    "metrics": metrics,
                    "client": ConfigRecord({"partition-id": node - 1}),
                }
            )
            replies.append(Message(content=content, reply_to=message))
        return replies


def test_recompute_replaces_averaged_batchnorm_statistics_with_measured_ones() -> None:
    cfg = load_config(REPO / "configs" / "cifar10.yaml", ["strategy.batchnorm=recompute"])
    strategy = build_strategy(cfg, recorder(), census(train=1000), min_available_nodes=5)
    grid = BatchNormGrid()
    start = ArrayRecord(
        {
            "w": Array(np.zeros(2, np.float32)),
            "bn.running_mean": Array(np.zeros(2, np.float32)),
            "bn.running_var": Array(np.ones(2, np.float32)),
        }
    )
    messages = list(strategy.configure_train(1, start, ConfigRecord(), grid))  # type: ignore[arg-type]
    replies = []
    for message in messages:
        arrays = ArrayRecord({key: Array(np.full(2, 7.0, np.float32)) for key in start})
        content = train_content(arrays, node_partition(message))
        replies.append(Message(content, reply_to=message))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    # Every client that trained was asked, with the new (averaged) model.
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [1, 2, 3, 4, 5]
    assert {m.metadata.message_type for m in grid.sent} == {"query.batchnorm_statistics"}
    np.testing.assert_array_equal(grid.sent[0].content.array_records["arrays"]["w"].numpy(), 7.0)
    # Example-weighted mean of clients 1-3 (100, 200, 300 samples); 4 and 5 left out.
    expected = (1 * 100 + 2 * 200 + 3 * 300) / 600
    np.testing.assert_allclose(arrays["bn.running_mean"].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), 10 * expected, rtol=1e-6)
    np.testing.assert_array_equal(arrays["w"].numpy(), 7.0)  # weights as aggregated
    assert list(arrays.keys()) == list(start.keys())
    assert (strategy.recorder.metrics["failures"], strategy.recorder.metrics["rejected"]) == (1, 1)


def test_after_a_resume_each_client_gets_back_its_own_accountant_only() -> None:
    strategy = build_strategy(load_config(MNIST), recorder(), census(), min_available_nodes=5)
    strategy.accountants = {0: "state of 0", 1: "state of 1"}
    strategy.resent_accountants = True
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    for message in messages:
        config = message.content.config_records["config"]
        partition = node_partition(message)
        resent = {k: v for k, v in config.items() if str(k).startswith("accountant-")}
        expected = strategy.accountants.get(partition)
        assert resent == ({f"accountant-{partition}": expected} if expected else {})
        assert "lr-factor" in config and "arrays" in message.content.array_records
