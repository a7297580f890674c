import json
from collections.abc import Iterable
from types import SimpleNamespace

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

from fl_lightning.config.load import load_config
from fl_lightning.config.schema import round_lr_factor
from fl_lightning.privacy.ledger import PrivacyLedger
from fl_lightning.server.census import Census
from fl_lightning.server.round_close import RoundRecorder
from fl_lightning.server.strategy import LightningFedAvg, build_strategy, restore_dtypes
from fl_lightning.vocabulary import (
    ACCOUNTANT_RECORD,
    EPSILON_METRIC,
    FIT_SECONDS,
    SETUP_SECONDS,
    UNIFORM_WEIGHT,
)
from tests.attacks import Attack, weights
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


class Probe:
    """The server's test of each new model (`CentralEvaluator.probe`): a verdict to give."""

    def __init__(self, problem: str | None = None) -> None:
        self.problem = problem
        self.tested: list[dict] = []
        self.cfg = load_config(MNIST)  # what the recorder reads its round watch from

    def probe(self, state_dict: dict) -> str | None:
        self.tested.append(state_dict)
        return self.problem


def recorder(problem: str | None = None) -> RoundRecorder:
    """A recorder for strategies whose rounds are aggregated but never closed here; its
    test of each new model finds `problem` (None: it passes)."""
    return RoundRecorder(Probe(problem), None, None)  # type: ignore[arg-type]


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


def test_the_round_logs_where_its_clients_spent_their_time() -> None:
    strategy = build_strategy(load_config(MNIST), recorder(), census(), min_available_nodes=5)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    replies = [reply_to(m, 0.1, 20, 100) for m in messages]
    for i, reply in enumerate(replies[:4]):  # the fifth says nothing: allowed
        reply.content.metric_records["metrics"][SETUP_SECONDS] = 0.1 * (i + 1)
        reply.content.metric_records["metrics"][FIT_SECONDS] = 2.0
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    logged = strategy.recorder.metrics
    assert logged["time/clients/setup"] == pytest.approx(0.25)
    assert logged["time/clients/fit"] == pytest.approx(2.0)
    assert not {SETUP_SECONDS, FIT_SECONDS} & set(strategy.recorder.sourced["train"])


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


def round_of_replies(
    strategy: LightningFedAvg, attack: Attack | None = None, clients: int = 5
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Configure round 1 and aggregate honest replies (client 4's changed by `attack`)."""
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    replies = []
    for message in sorted(messages, key=node_partition)[:clients]:
        reply = reply_to(message, 0.1 * (node_partition(message) + 1), 20, 100)
        if attack is not None and node_partition(message) == 4:
            attack(reply.content)
        replies.append(reply)
    return strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
@pytest.mark.parametrize("value", [1e30, 1e8])
def test_an_update_far_larger_than_the_rounds_is_rejected_before_aggregation(
    name: str, value: float
) -> None:
    # The review's attack: every weight 1e30 (or 1e8), finite, so the reply screen passes it.
    # FedAvg adopted a 2e29 model, FedAdam's second moment overflowed and froze the run.
    cfg = load_config(MNIST, [f"strategy.name={name}"])
    clean = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    dirty = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    clean_arrays, _ = round_of_replies(clean, clients=4)
    dirty_arrays, _ = round_of_replies(dirty, weights(value))
    assert clean_arrays is not None and dirty_arrays is not None
    np.testing.assert_array_equal(dirty_arrays["w"].numpy(), clean_arrays["w"].numpy())
    assert dirty.recorder.metrics["rejected"] == 1
    assert "update_norm_factor" in str(dirty.census.notices.reasons.get("client 4"))
    if name == "fedadam":
        assert all(np.isfinite(v).all() for v in dirty.v_t.values())  # type: ignore[attr-defined]


def test_under_client_level_dp_only_the_absolute_bound_applies() -> None:
    # A bound relative to the others would let one client's update decide whether another's
    # is used, which the noise calibration does not cover; the absolute one does not.
    five = ["federation.num_clients=5", "federation.fraction_train=1.0"]
    for extra, rejected in (([], 0), (["strategy.max_update_norm=2"], 1)):
        cfg = load_config(REPO / "configs" / "mnist_client_dp.yaml", [*five, *extra])
        strategy = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
        round_of_replies(strategy, weights(1e3))
        assert strategy.recorder.metrics["rejected"] == rejected, extra


def test_a_server_optimizer_state_that_would_not_be_finite_skips_the_round() -> None:
    # Without the update screen, one reply of 1e30 overflows FedAdam's second moment (float32
    # squares): the aggregate is finite, the state is not. The round is skipped, the
    # moments left as they were, and the skip counted.
    cfg = load_config(MNIST, ["strategy.name=fedadam", "strategy.update_norm_factor=null"])
    strategy = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    assert round_of_replies(strategy, weights(1e30)) == (None, None)
    assert strategy.v_t is None and strategy.m_t is None  # type: ignore[attr-defined]
    assert strategy.recorder.metrics["skipped"] == 1 and strategy.rounds_adopted == 0
    arrays, _ = round_of_replies(strategy)  # the next round trains as if nothing happened
    assert arrays is not None and strategy.rounds_adopted == 1


def test_a_model_whose_server_side_test_is_not_finite_is_not_adopted() -> None:
    strategy = build_strategy(
        load_config(MNIST), recorder("test/loss is nan"), census(), min_available_nodes=5
    )
    assert round_of_replies(strategy) == (None, None)
    assert strategy.recorder.metrics["skipped"] == 1 and strategy.rounds_adopted == 0
    passing = build_strategy(load_config(MNIST), recorder(), census(), min_available_nodes=5)
    arrays, _ = round_of_replies(passing)
    assert arrays is not None
    # What was tested is what is adopted.
    (tested,) = passing.recorder.evaluator.tested  # type: ignore[attr-defined]
    np.testing.assert_array_equal(tested["w"].numpy(), arrays["w"].numpy())


def test_only_nodes_the_census_bound_are_sampled() -> None:
    # Node 5 is unbound (two nodes claimed its partition, or it did not answer): it is sent
    # nothing, so it is neither a failure nor a rejection.
    bound = census()
    del bound.nodes[5]
    strategy = build_strategy(load_config(MNIST), recorder(), bound, min_available_nodes=4)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3, 4]
    replies = [reply_to(m, 0.1, 20, 100) for m in messages]
    strategy.aggregate_train(1, replies)
    assert (strategy.recorder.metrics["failures"], strategy.recorder.metrics["rejected"]) == (0, 0)


def test_a_dp_sgd_reply_whose_epsilon_its_plan_does_not_give_is_rejected() -> None:
    # The review's attack: privacy/epsilon = 1e300 became the run's logged epsilon. The
    # server knows each client's plan and the rounds it sent it training: a reply's epsilon
    # and accountant must be what they give, and the logged epsilon is the server's own.
    cfg = load_config(REPO / "configs" / "mnist_dp_sgd.yaml")
    rounds = recorder()
    rounds.ledger = ledger = PrivacyLedger(cfg, [100] * 5)
    strategy = build_strategy(cfg, rounds, census(), min_available_nodes=5)
    plan = ledger.plans[0]
    epsilon = plan.epsilon(1, cfg.privacy.delta)
    state = json.dumps(
        {"history": [[plan.noise_multiplier, plan.sample_rate, plan.steps_per_round]],
         "mechanism": cfg.privacy.accountant}
    )  # fmt: skip

    def dp(reported: float) -> Attack:
        def reply(content: RecordDict) -> None:
            content.metric_records["metrics"][EPSILON_METRIC] = reported
            content[ACCOUNTANT_RECORD] = ConfigRecord({"state": state})

        return reply

    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    replies = []
    for message in messages:
        reply = reply_to(message, 0.1, 20, 100)
        dp(1e300 if node_partition(message) == 4 else epsilon)(reply.content)
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and rounds.metrics["rejected"] == 1
    assert "it reports epsilon 1e+300" in str(strategy.census.notices.reasons["client 4"])
    assert ledger.metrics()["epsilon"] == pytest.approx(epsilon)
    assert ledger.trained == [1, 1, 1, 1, 0] and ledger.sampled == [1] * 5


def test_a_client_past_its_privacy_budget_is_not_sampled_and_the_round_goes_on() -> None:
    # Flower waits for `min_available_nodes` of the nodes a round may sample: with a client
    # left out for its budget, a fixed number (all bound nodes) would wait forever.
    cfg = load_config(
        REPO / "configs" / "mnist_dp_sgd.yaml",
        ["privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"],
    )
    rounds = recorder()
    rounds.ledger = ledger = PrivacyLedger(cfg, [9720, 9720, 9720, 9720, 1])
    honest, hungry = ledger.client_epsilon(0, 1), ledger.client_epsilon(4, 1)
    ledger.max_epsilon = (honest + hungry) / 2
    rounds.tracker = SimpleNamespace(note=lambda text: None)  # type: ignore[assignment]
    strategy = build_strategy(cfg, rounds, census())  # as the ServerApp builds it
    assert strategy.min_available_nodes == 1  # of the nodes the round may sample
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    assert sorted(node_partition(m) for m in messages) == [0, 1, 2, 3]
    assert ledger.sampled == [1, 1, 1, 1, 0]


def test_a_dp_sgd_client_whose_update_is_rejected_keeps_its_accountant() -> None:
    # It trained (its accountant says so): after a --resume it must get that accountant back,
    # or every later reply would show more rounds than the server credited.
    cfg = load_config(REPO / "configs" / "mnist_dp_sgd.yaml")
    rounds = recorder()
    rounds.ledger = ledger = PrivacyLedger(cfg, [100] * 5)
    strategy = build_strategy(cfg, rounds, census())
    plan = ledger.plans[0]
    state = json.dumps(
        {"history": [[plan.noise_multiplier, plan.sample_rate, plan.steps_per_round]],
         "mechanism": cfg.privacy.accountant}
    )  # fmt: skip
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    replies = []
    for message in messages:
        reply = reply_to(message, 0.1, 20, 100)
        reply.content.metric_records["metrics"][EPSILON_METRIC] = plan.epsilon(1, 1e-5)
        reply.content[ACCOUNTANT_RECORD] = ConfigRecord({"state": state})
        if node_partition(message) == 4:
            weights(1e30)(reply.content)  # its update is rejected by the norm screen
        replies.append(reply)
    strategy.aggregate_train(1, replies)
    assert rounds.metrics["rejected"] == 1
    assert sorted(strategy.accountants) == [0, 1, 2, 3, 4]
    assert ledger.trained == [1] * 5
