"""The reply screen against malicious clients: every attack rejected, counted, never raising."""

import logging
import math
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SType
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.server.checks import partition_of
from fl_lightning.server.reply_screen import BATCHNORM, EVALUATE, TRAIN, ReplyScreen, arrays_problem
from fl_lightning.server.strategy import LightningFedAvg, build_strategy
from fl_lightning.vocabulary import (
    ACCOUNTANT_RECORD,
    FIT_SECONDS,
    SETUP_SECONDS,
    UNIFORM_WEIGHT,
)
from tests import attacks
from tests.test_accountant_state import MALFORMED as MALFORMED_ACCOUNTANTS
from tests.test_accountant_state import honest_accountant
from tests.test_config import MNIST, REPO
from tests.test_strategy import FakeGrid, census, global_arrays, recorder, train_content

NAN = float("nan")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the process's task identity, which a runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def sent(node: int, message_type: str = MessageType.TRAIN) -> Message:
    """A message the server sent to `node` (what a reply answers)."""
    return Message(RecordDict(), dst_node_id=node, message_type=message_type)


def train_reply(partition: int, shift: float = 0.0, examples: int = 100) -> Message:
    """An honest train reply of client `partition` (node partition + 1)."""
    arrays = ArrayRecord(
        {
            "w": Array(np.full((2, 3), 0.1 * (partition + 1) + shift, np.float32)),
            "count": Array(np.array(20 + partition, np.int64)),
        }
    )
    content = train_content(arrays, partition, examples, loss=0.1 * (partition + 1))
    return Message(content, reply_to=sent(partition + 1))


def evaluate_reply(partition: int, examples: int = 10) -> Message:
    """An honest evaluate reply of client `partition`."""
    metrics = MetricRecord(
        {
            "val/loss": 0.2 * (partition + 1),
            "val/accuracy": 0.1 * (partition + 1),
            "num-examples": examples,
            UNIFORM_WEIGHT: 1,
        }
    )
    content = RecordDict({"metrics": metrics, "client": ConfigRecord({"partition-id": partition})})
    return Message(content, reply_to=sent(partition + 1, MessageType.EVALUATE))


def attacked(reply: Message, attack: attacks.Attack) -> Message:
    """`reply` with `attack` applied to (a copy of) its records."""
    content = RecordDict(
        {
            **{k: ArrayRecord(dict(v)) for k, v in reply.content.array_records.items()},
            **{k: MetricRecord(dict(v)) for k, v in reply.content.metric_records.items()},
            **{k: ConfigRecord(dict(v)) for k, v in reply.content.config_records.items()},
        }
    )
    attack(content)
    return Message(content, reply_to=sent(reply.metadata.src_node_id, reply.metadata.message_type))


TRAIN_ATTACKS: dict[str, attacks.Attack] = {
    "num-examples 1e12": attacks.metric("num-examples", 10**12),
    "num-examples NaN": attacks.metric("num-examples", NAN),
    "num-examples 0": attacks.metric("num-examples", 0),
    "num-examples negative": attacks.metric("num-examples", -100),
    "num-examples a float": attacks.metric("num-examples", 100.0),
    "num-examples above the partition": attacks.metric("num-examples", 101),
    "uniform-weight 5": attacks.metric(UNIFORM_WEIGHT, 5),
    "scalar declared float32 (2, 3)": attacks.scalar_as_array,
    "float64 1e300 declared float32": attacks.float64_as_float32,
    "unknown stype": attacks.unknown_stype,
    "bytes that are no array": attacks.garbage_bytes,
    "no partition id": attacks.no_partition_id,
    "partition id a string": attacks.partition_id("4"),
    "partition id a float": attacks.partition_id(4.0),
    "partition id a bool": attacks.partition_id(True),
    "partition id out of range": attacks.partition_id(5),
    "partition id negative": attacks.partition_id(-1),
    "another client's partition id": attacks.partition_id(0),
    "extra metric": attacks.metric("train/secret", 1.0),
    "missing metric": attacks.missing_metric("train/accuracy"),
    "list-valued metric": attacks.metric("train/loss", [1.0, 2.0]),
    "NaN metric": attacks.metric("train/loss", NAN),
    "accuracy above 1": attacks.metric("train/accuracy", 3.0),
    "extra record": attacks.extra_record,
    "setup seconds negative": attacks.metric(SETUP_SECONDS, -1.0),
    "fit seconds beyond the round's timeout": attacks.metric(FIT_SECONDS, 1e9),
    "fit seconds NaN": attacks.metric(FIT_SECONDS, NAN),
}


def screen_for(cfg: Config | None = None, clients: int = 5) -> ReplyScreen:
    return ReplyScreen(cfg or load_config(MNIST), census(clients))


@pytest.mark.parametrize("attack", TRAIN_ATTACKS.values(), ids=TRAIN_ATTACKS.keys())
def test_each_train_attack_is_rejected_with_a_reason(attack: attacks.Attack) -> None:
    screen = screen_for()
    learned = screen.screen([train_reply(i) for i in range(4)], TRAIN, global_arrays())
    assert len(learned.valid) == 4  # a first round: the run's metric names are now known
    assert screen.problem(train_reply(4), TRAIN, global_arrays()) is None  # honest: usable
    reply = attacked(train_reply(4), attack)
    reason = screen.problem(reply, TRAIN, global_arrays())
    assert isinstance(reason, str) and reason
    screened = screen.screen([train_reply(0), reply], TRAIN, global_arrays())
    assert (len(screened.valid), screened.failures, screened.rejected) == (1, 0, 1)


def test_reasons_name_what_is_wrong() -> None:
    screen = screen_for()
    screen.screen([train_reply(i) for i in range(4)], TRAIN, global_arrays())  # names learned

    def why(attack: attacks.Attack) -> str:
        return str(screen.problem(attacked(train_reply(4), attack), TRAIN, global_arrays()))

    assert "num-examples is 1000000000000, not an integer in 1..100" in why(
        TRAIN_ATTACKS["num-examples 1e12"]
    )
    assert "its bytes hold float64" in why(attacks.float64_as_float32)
    assert "its bytes hold float32 ()" in why(attacks.scalar_as_array)
    assert "serialization type 'torch.pickle'" in why(attacks.unknown_stype)
    assert "claims partition 0, its node answered the census as 4" in why(attacks.partition_id(0))
    assert "unexpected ['train/secret']" in why(attacks.metric("train/secret", 1.0))


def _strip_module_metrics(content: RecordDict) -> None:
    metrics = content.metric_records["metrics"]
    for key in [k for k in metrics if k.startswith("train/")]:
        del metrics[key]


def _prefix_module_metrics(prefix: str) -> attacks.Attack:
    def rename(content: RecordDict) -> None:
        metrics = content.metric_records["metrics"]
        for key in [k for k in metrics if k.startswith("train/")]:
            metrics[prefix + key] = metrics.pop(key)

    return rename


def test_the_first_rounds_majority_fixes_the_metric_names_for_the_run() -> None:
    screen = screen_for()
    odd = attacked(train_reply(4), attacks.metric("train/secret", 1.0))
    first = screen.screen([odd, *(train_reply(i) for i in range(4))], TRAIN, global_arrays())
    assert (len(first.valid), first.rejected) == (4, 1)  # outvoted, whatever the order
    assert screen.metric_names[TRAIN] == {"train/loss", "train/accuracy"}
    # A module of the user's own: its names, whatever they are, are the run's.
    renamed = [attacked(train_reply(i), _prefix_module_metrics("f1_")) for i in range(3)]
    fresh = screen_for()
    assert len(fresh.screen(renamed, TRAIN, global_arrays()).valid) == 3
    assert fresh.metric_names[TRAIN] == {"f1_train/loss", "f1_train/accuracy"}


@pytest.mark.parametrize(
    "first_round",
    [
        [attacks.missing_metric("train/loss")],  # alone in round 1 (the others failed)
        [attacks.metric("train/a", 1.0), None],  # with one honest client: a tie
        [_strip_module_metrics, None],  # no names at all, with one honest client
    ],
    ids=["alone", "tie", "no names"],
)
def test_a_minority_cannot_choose_the_runs_metric_names(first_round: list) -> None:
    screen = screen_for()
    replies = [
        train_reply(i) if attack is None else attacked(train_reply(i), attack)
        for i, attack in enumerate(first_round)
    ]
    screen.screen(replies, TRAIN, global_arrays())
    assert TRAIN not in screen.metric_names  # fewer than half the partitions agreed
    honest = screen.screen([train_reply(i) for i in range(5)], TRAIN, global_arrays())
    assert (len(honest.valid), honest.rejected) == (5, 0)
    assert screen.metric_names[TRAIN] == {"train/loss", "train/accuracy"}


@pytest.mark.parametrize(
    ("first", "plain", "larger", "kept"),
    [
        # 2 of 5 partitions voted: a third vote makes their names the run's.
        ([0, 1], [2], [3], [2]),
        # All 5 agreed: a name first sent in a later round is not the run's.
        ([0, 1, 2, 3, 4], [], [0, 1, 2, 3, 4], []),
    ],
    ids=["voted", "agreed"],
)
def test_a_resumed_run_screens_with_the_metric_names_of_the_run_it_continues(
    first: list[int], plain: list[int], larger: list[int], kept: list[int], tmp_path: Path
) -> None:
    more = attacks.metric("train/extra", 1.0)  # a larger name set (a tie goes to it)
    screen = screen_for()
    screen.screen([train_reply(p) for p in first], TRAIN, global_arrays())
    file = tmp_path / "screen.pt"
    torch.save(screen.state(), file)
    resumed = screen_for()
    resumed.load_state(torch.load(file, weights_only=True))  # as resume.pt keeps it
    second = [train_reply(p) for p in plain] + [attacked(train_reply(p), more) for p in larger]
    for run in (screen, resumed):
        screened = run.screen(second, TRAIN, global_arrays())
        assert [partition_of(r) for r in screened.valid] == kept
        assert screened.rejected == len(second) - len(kept)
        assert run.metric_names[TRAIN] == {"train/loss", "train/accuracy"}


def test_a_reply_from_a_node_outside_the_census_is_rejected() -> None:
    screen = screen_for()
    reply = Message(train_reply(4).content, reply_to=sent(9))  # node 9: not in the census
    assert "node 9 has no partition" in str(screen.problem(reply, TRAIN, global_arrays()))


def test_a_second_reply_for_a_partition_is_rejected() -> None:
    screen = screen_for()
    screened = screen.screen([train_reply(3), train_reply(3, shift=1.0)], TRAIN, global_arrays())
    assert (len(screened.valid), screened.rejected) == (1, 1)


def test_dp_sgd_replies_need_their_epsilon_and_accountant() -> None:
    cfg = load_config(REPO / "configs" / "mnist_dp_sgd.yaml")
    screen = screen_for(cfg)

    def dp_reply(content: RecordDict) -> None:
        content.metric_records["metrics"]["privacy/epsilon"] = 0.5
        content[ACCOUNTANT_RECORD] = ConfigRecord({"state": honest_accountant()})

    honest = attacked(train_reply(4), dp_reply)
    assert screen.problem(honest, TRAIN, global_arrays()) is None
    for attack in (
        attacks.missing_metric("privacy/epsilon"),
        attacks.metric("privacy/epsilon", -1.0),
        lambda content: content.config_records.pop(ACCOUNTANT_RECORD),
    ):
        assert screen.problem(attacked(honest, attack), TRAIN, global_arrays()) is not None
    # Without DP-SGD, an epsilon is an extra metric.
    assert screen_for().problem(honest, TRAIN, global_arrays()) is not None


@pytest.mark.parametrize("state", MALFORMED_ACCOUNTANTS.values(), ids=MALFORMED_ACCOUNTANTS.keys())
def test_a_reply_with_a_malformed_accountant_state_is_rejected(state: str) -> None:
    # The server keeps it for --resume: one hostile state would make the run un-resumable.
    screen = screen_for(load_config(REPO / "configs" / "mnist_dp_sgd.yaml"))

    def dp_reply(accountant: str) -> attacks.Attack:
        def make(content: RecordDict) -> None:
            content.metric_records["metrics"]["privacy/epsilon"] = 0.5
            content[ACCOUNTANT_RECORD] = ConfigRecord({"state": accountant})

        return make

    reply = attacked(train_reply(4), dp_reply(state))
    assert str(screen.problem(reply, TRAIN, global_arrays())).startswith("its accountant state ")
    honest = attacked(train_reply(0), dp_reply(honest_accountant()))
    screened = screen.screen([honest, reply], TRAIN, global_arrays())
    assert (len(screened.valid), screened.failures, screened.rejected) == (1, 0, 1)


def test_client_dp_accepts_only_a_uniform_weight_of_one() -> None:
    cfg = load_config(REPO / "configs" / "mnist_client_dp.yaml")
    screen = screen_for(cfg)
    for weight, usable in ((1, True), (1.0, True), (2, False), (0.5, False), (NAN, False)):
        reply = attacked(train_reply(4), attacks.metric(UNIFORM_WEIGHT, weight))
        assert (screen.problem(reply, TRAIN, global_arrays()) is None) == usable, weight


EVALUATE_ATTACKS: dict[str, attacks.Attack] = {
    "num-examples above the validation split": attacks.metric("num-examples", 11),
    "num-examples a float": attacks.metric("num-examples", 3.5),
    "extra metric": attacks.metric("val/secret", 1.0),
    "missing metric": attacks.missing_metric("val/loss"),
    "list-valued metric": attacks.metric("val/accuracy", [0.5]),
    "NaN metric": attacks.metric("val/loss", NAN),
    "another client's partition id": attacks.partition_id(1),
    "arrays where none belong": lambda c: c.__setitem__("arrays", global_arrays()),
    "train timings in an evaluation": attacks.metric(FIT_SECONDS, 1.0),
}


@pytest.mark.parametrize("attack", EVALUATE_ATTACKS.values(), ids=EVALUATE_ATTACKS.keys())
def test_each_evaluate_attack_leaves_the_distributed_metrics_as_without_the_attacker(
    attack: attacks.Attack,
) -> None:
    def distributed(replies: list[Message]) -> dict[str, float]:
        strategy = build_strategy(load_config(MNIST), recorder(), census(), min_available_nodes=5)
        metrics = strategy.aggregate_evaluate(1, replies)
        assert metrics is not None
        return {**dict(metrics), "rejected": strategy.recorder.metrics["rejected"]}  # type: ignore[dict-item]

    honest = [evaluate_reply(p) for p in range(4)]
    with_attacker = distributed([*honest, attacked(evaluate_reply(4), attack)])
    assert with_attacker == {**distributed(honest), "rejected": 1}


def test_batchnorm_statistics_replies_are_screened_like_updates() -> None:
    screen = screen_for()
    reference = ArrayRecord({"bn.running_mean": Array(np.zeros(2, np.float32))})
    content = RecordDict(
        {
            "arrays": ArrayRecord({"bn.running_mean": Array(np.ones(2, np.float32))}),
            "metrics": MetricRecord({"num-examples": 50, UNIFORM_WEIGHT: 1}),
            "client": ConfigRecord({"partition-id": 2}),
        }
    )
    honest = Message(content, reply_to=sent(3, "query.batchnorm_statistics"))
    assert screen.problem(honest, BATCHNORM, reference) is None
    for attack in (attacks.metric("num-examples", 10**12), attacks.metric("num-examples", NAN)):
        assert screen.problem(attacked(honest, attack), BATCHNORM, reference) is not None


def test_negative_batchnorm_variances_are_rejected() -> None:
    reference = ArrayRecord({"bn.running_var": Array(np.ones(2, np.float32))})
    negative = ArrayRecord({"bn.running_var": Array(np.array([1.0, -0.5], np.float32))})
    assert "negative variances" in (arrays_problem(negative, reference) or "")
    assert arrays_problem(reference, reference) is None


def aggregate(strategy: LightningFedAvg, replies: list[Message]) -> tuple[dict, dict]:
    """Configure round 1 (the global model, 5 nodes), aggregate `replies`."""
    list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    return {k: v.numpy() for k, v in arrays.items()}, dict(metrics)


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
@pytest.mark.parametrize(
    "attack",
    [*TRAIN_ATTACKS.values(), "duplicate"],
    ids=[*TRAIN_ATTACKS.keys(), "duplicate"],
)
def test_an_attackers_update_changes_nothing_in_the_aggregate(
    name: str, attack: attacks.Attack | str
) -> None:
    cfg = load_config(MNIST, [f"strategy.name={name}"])
    honest = [train_reply(p) for p in range(4)]
    bad = train_reply(3, shift=5.0) if attack == "duplicate" else attacked(train_reply(4), attack)  # type: ignore[arg-type]
    clean = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    dirty = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    clean_arrays, clean_metrics = aggregate(clean, honest)
    dirty_arrays, dirty_metrics = aggregate(dirty, [*honest, bad])
    assert clean_arrays.keys() == dirty_arrays.keys()
    for key in clean_arrays:
        np.testing.assert_array_equal(dirty_arrays[key], clean_arrays[key])
    assert dirty_metrics == clean_metrics
    assert (clean.recorder.metrics["rejected"], dirty.recorder.metrics["rejected"]) == (0, 1)


def test_screen_train_is_idempotent_within_a_round() -> None:
    # The client-level DP wrapper screens the raw replies, then aggregate_train screens
    # the screened list again: nothing may be counted twice, nothing lost.
    strategy = build_strategy(load_config(MNIST), recorder(), census(), min_available_nodes=5)
    list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    failed = Message(Error(0, "RuntimeError: boom"), reply_to=sent(4))
    raw = [train_reply(1), attacked(train_reply(4), attacks.unknown_stype), failed, train_reply(0)]
    first = strategy.updates.train(1, raw)
    again = strategy.updates.train(1, first)
    assert [r.content.config_records["client"]["partition-id"] for r in first] == [0, 1]
    assert [id(r) for r in again] == [id(r) for r in first]
    # 5 sent, 4 replied: one missing, one failed, one rejected, each counted once.
    assert (strategy.recorder.metrics["failures"], strategy.recorder.metrics["rejected"]) == (2, 1)
    # A second reply of a partition already used this round is still refused.
    assert strategy.updates.train(1, [*first, train_reply(1, shift=1.0)]) == first
    assert strategy.recorder.metrics["rejected"] == 2


def test_a_non_finite_aggregate_is_refused_and_the_round_skipped() -> None:
    # Every update is finite, but FedAvgM's step from a global model at -3e38 to clients
    # at +3e38 overflows float32: the round is skipped, the server momentum left as it was.
    start = ArrayRecord(
        {"w": Array(np.full((2, 3), -3e38, np.float32)), "count": Array(np.array(10, np.int64))}
    )

    def huge(content: RecordDict) -> None:
        content.array_records["arrays"]["w"] = Array(np.full((2, 3), 3e38, np.float32))

    cfg = load_config(MNIST, ["strategy.name=fedavgm"])
    strategy = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    list(strategy.configure_train(1, start, ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    replies = [attacked(train_reply(p), huge) for p in range(2)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.rounds_adopted == 0
    assert strategy.momentum_vector is None  # type: ignore[attr-defined]


# --- fuzz: random records never make the screen raise ----------------------------------

_DTYPES = ["float32", "float64", "int64", "int8", "bool", "<U3", "object", "bogus", ">f4"]


def _npy_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["array", "header", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "array":
        dtype = draw(st.sampled_from(["float32", "float64", "int64", "<U2", ">f4"]))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        buffer = BytesIO()
        values = np.full(shape, draw(st.sampled_from([0, 1, 1e300, NAN])), dtype=np.float64)
        with np.errstate(all="ignore"):  # NaN and 1e300 into integers and float32
            np.save(buffer, values.astype(dtype), allow_pickle=False)
        return buffer.getvalue()
    # A well-formed magic with a hostile header: huge shapes, odd dtypes, nonsense.
    descr = draw(st.sampled_from(["'<f4'", "'<f8'", "'|O'", "'>f4'", "[('a', '<f4')]", "1"]))
    shape = draw(st.sampled_from(["(2, 3)", "()", "(10**12,)", "(-1,)", "(2**62, 2**62)", "'x'"]))
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    prefix = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
    return prefix + header + draw(st.binary(max_size=32))


@st.composite
def arrays_records(draw: st.DrawFn) -> ArrayRecord:
    keys = draw(st.lists(st.sampled_from(["w", "count", "x"]), max_size=3, unique=True))
    record = ArrayRecord()
    for key in keys:
        record[key] = draw(hostile_array(key))
    return record


_NUMBERS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 5), max_size=3),
    st.lists(st.floats(), max_size=3),
)
_METRIC_KEYS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy", "num-examples"]
_METRIC_KEYS += [UNIFORM_WEIGHT, "privacy/epsilon", "other"]


@st.composite
def metric_records(draw: st.DrawFn) -> MetricRecord:
    keys = draw(st.lists(st.sampled_from(_METRIC_KEYS), max_size=8, unique=True))
    return MetricRecord({key: draw(_NUMBERS) for key in keys})


_CONFIG_VALUES = st.one_of(
    st.integers(-3, 8),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.booleans(),
    st.lists(st.integers(-3, 200), max_size=12),
)


@st.composite
def config_records(draw: st.DrawFn) -> ConfigRecord:
    keys = ["partition-id", "train-size", "val-size", "label-counts", "state", "x"]
    chosen = draw(st.lists(st.sampled_from(keys), max_size=5, unique=True))
    return ConfigRecord({key: draw(_CONFIG_VALUES) for key in chosen})


TRAIN_METRICS = ["train/loss", "train/accuracy"]


@st.composite
def hostile_array(draw: st.DrawFn, key: str) -> Array:
    """An Array under `key`: declared as the model's or not, carrying any bytes."""
    if draw(st.booleans()):  # declared exactly as the model's array
        shape = (2, 3) if key == "w" else ()
        dtype = "float32" if key == "w" else "int64"
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = draw(st.sampled_from(_DTYPES))
    stype = draw(st.sampled_from([SType.NUMPY, SType.NUMPY, "torch", ""]))
    return Array(dtype=dtype, shape=shape, stype=stype, data=_npy_bytes(draw))


@st.composite
def mutated_replies(draw: st.DrawFn) -> Message:
    """An honest train reply with one part replaced: reaches the screen's deepest checks."""
    partition = draw(st.integers(0, 4))
    content = train_reply(partition).content
    part = draw(st.sampled_from(["array", "array", "metric", "identity", "node"]))
    node = partition + 1
    if part == "array":
        key = draw(st.sampled_from(["w", "count"]))
        content.array_records["arrays"][key] = draw(hostile_array(key))
    elif part == "metric":
        key = draw(st.sampled_from([*TRAIN_METRICS, "num-examples", UNIFORM_WEIGHT]))
        content.metric_records["metrics"][key] = draw(_NUMBERS)
    elif part == "identity":
        content.config_records["client"]["partition-id"] = draw(_CONFIG_VALUES)
    else:
        node = draw(st.integers(0, 7))
    return Message(content, reply_to=sent(node))


@st.composite
def random_replies(draw: st.DrawFn) -> Message:
    node = draw(st.integers(0, 7))
    if draw(st.integers(0, 9)) == 0:
        return Message(Error(draw(st.integers(0, 5)), draw(st.text())), reply_to=sent(node))
    content = RecordDict()
    names = ["arrays", "metrics", "client", "census", ACCOUNTANT_RECORD, "other"]
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        kind = draw(st.sampled_from(["arrays", "metrics", "config", "expected"]))
        if kind == "expected":  # the type this name usually has
            kind = {"arrays": "arrays", "metrics": "metrics"}.get(name, "config")
        maker = {"arrays": arrays_records, "metrics": metric_records, "config": config_records}
        content[name] = draw(maker[kind]())
    return Message(content, reply_to=sent(node))


FUZZ_CONFIG = load_config(MNIST)


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.one_of(mutated_replies(), random_replies()), min_size=1, max_size=2))
def test_no_record_makes_the_screen_raise(random_replies: list[Message]) -> None:
    from fl_lightning.server.census import Known, tally

    cfg = FUZZ_CONFIG
    screen = screen_for(cfg)
    reference = global_arrays()
    for stage in (TRAIN, EVALUATE, BATCHNORM):
        screened = screen.screen([*random_replies, train_reply(0)], stage, reference)
        # Whatever got through aggregates into finite arrays of the model's shapes.
        if stage != EVALUATE and screened.valid:
            contents = [r.content for r in screened.valid]
            arrays = aggregate_arrayrecords(contents, "num-examples")
            assert np.isfinite(arrays["w"].numpy()).all()
            assert arrays["w"].numpy().shape == (2, 3)
    tally(random_replies, cfg, Known(tuple("0123456789")))  # the same hostile records


# --- real simulations -------------------------------------------------------------------

ROUNDS = 5
# Client 4 lies differently each round, in its train replies and in its evaluate replies.
TRAIN_PLAN = {
    1: attacks.metric("num-examples", 10**12),
    2: attacks.float64_as_float32,
    3: attacks.unknown_stype,
    4: attacks.partition_id(0),
    5: attacks.weights(1e30),  # well-formed, finite: the update screen's
}
EVALUATE_PLAN = {
    1: attacks.metric("val/secret", 1.0),
    2: attacks.metric("val/accuracy", [1.0]),
    3: attacks.metric("val/loss", NAN),
    4: attacks.partition_id(0),
    5: attacks.metric("val/accuracy", 2.0),
}


def comparable(record: dict) -> dict:
    """A metrics.jsonl record without timings and the failure/rejection counts."""
    dropped = ("seconds", "failures", "rejected")
    return {k: v for k, v in record.items() if not k.startswith("time/") and k not in dropped}


def test_an_attacker_is_as_harmless_as_a_client_that_fails(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests import faults
    from tests.test_end_to_end import read_metrics
    from tests.test_faults import simulate

    caplog.set_level(logging.WARNING, logger="flwr")
    sizes = {"clients": 5, "per_client": 60}
    overrides = [f"federation.num_rounds={ROUNDS}", "data.max_test_samples=200"]
    mod = attacks.attacking(4, TRAIN_PLAN, EVALUATE_PLAN)
    attack = read_metrics(simulate(data_root, tmp_path / "attack", overrides, [mod], **sizes).path)
    said = " | ".join(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())
    for reason in (
        "num-examples is 1000000000000",
        "its bytes hold float64",
        "serialization type 'torch.pickle'",
        "it claims partition 0, its node answered the census as 4",
        "unexpected ['val/secret']",
        "metric val/accuracy is [1.0]",
        "metric val/loss is nan",
        "x the round's median",
        "metric val/accuracy is 2.0, outside [0, 1]",
    ):
        assert reason in said, reason  # each attack refused for what it is
    # It answers the census (as the attacker does), then fails every message.
    failing = faults.raising([4], message_types=[MessageType.TRAIN, MessageType.EVALUATE])
    fail = read_metrics(simulate(data_root, tmp_path / "fail", overrides, [failing], **sizes).path)
    assert [r["round"] for r in attack] == list(range(ROUNDS + 1))  # the run completed
    assert [(r["rejected"], r["failures"]) for r in attack[1:]] == [(2, 0)] * ROUNDS
    assert [(r["rejected"], r["failures"]) for r in fail[1:]] == [(0, 2)] * ROUNDS
    for attacked_round, failed_round in zip(attack, fail, strict=True):
        a, f = comparable(attacked_round), comparable(failed_round)
        assert a.keys() == f.keys()
        for key in a:
            assert math.isclose(a[key], f[key], rel_tol=1e-6, abs_tol=1e-6), key
    print("final", {k: attack[-1][k] for k in sorted(comparable(attack[-1]))})


def test_a_run_that_trained_nothing_ends_with_one_line(data_root: Path, tmp_path: Path) -> None:
    from fl_lightning.errors import NothingTrained
    from tests import faults
    from tests.test_end_to_end import read_metrics
    from tests.test_faults import simulate

    # Both clients answer the census, then fail every training message.
    mods = [faults.raising([0, 1], message_types=[MessageType.TRAIN])]
    out = tmp_path / "run"
    with pytest.raises(NothingTrained) as raised:
        simulate(data_root, out, ["federation.num_rounds=1"], mods, clients=2, per_client=60)
    message = str(raised.value)
    assert "\n" not in message
    assert "no round of the run adopted an update" in message
    assert "RuntimeError: injected failure in client" in message
    # The run directory keeps what the run wrote.
    assert [r["round"] for r in read_metrics(out)] == [0, 1]
    assert "no round of the run adopted an update" in (out / "summary.md").read_text()


def test_the_cli_says_it_in_one_line_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_overrides: list[str]
) -> None:
    from fl_lightning import cli
    from fl_lightning.errors import NothingTrained
    from fl_lightning.run import simulation

    def nothing(*args: object, **kwargs: object) -> None:
        raise NothingTrained("no round of the run adopted an update, so nothing was trained")

    monkeypatch.setattr(simulation, "run_simulation", nothing)
    assert cli.main(["run", "configs/mnist.yaml", *tiny_overrides]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: no round of the run")
    # It recorded no round: its claimed directory is given back, so a rerun there works.
    out = Path(next(o for o in tiny_overrides if o.startswith("output.dir=")).split("=", 1)[1])
    assert not out.exists()
