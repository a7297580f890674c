"""The census: what clients say they hold, screened, bound to their nodes."""

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_lightning.config.load import load_config
from fl_lightning.errors import ConfigError, NothingTrained
from fl_lightning.server.census import (
    CENSUS_MESSAGE_TYPE,
    Known,
    census_problem,
    take_census,
    tally,
)
from tests.test_config import MNIST

CLASSES = 10
KNOWN = Known(tuple(str(c) for c in range(CLASSES)))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the process's task identity, which a runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def answer(
    node: int, partition: object, train: object = 60, val: object = 6, own: object = False, **extra
) -> Message:
    """Node `node`'s census reply (label counts: all of `train` in class 0, unless given)."""
    record = ConfigRecord({"train-size": train, "val-size": val, "own-data": own})  # type: ignore[dict-item]
    record["label-counts"] = extra.get("labels", [train] + [0] * (CLASSES - 1))
    for key in extra.get("drop", ()):
        del record[key]
    content = RecordDict(
        {"client": ConfigRecord({"partition-id": partition}), "census": record}  # type: ignore[dict-item]
    )
    query = Message(RecordDict(), dst_node_id=node, message_type=CENSUS_MESSAGE_TYPE)
    return Message(content, reply_to=query)


def test_honest_answers_bind_nodes_to_partitions_with_their_sizes() -> None:
    cfg = load_config(MNIST)  # 5 clients
    census = tally([answer(10 + p, p, train=50 + p) for p in range(5)], cfg, KNOWN)
    assert census.nodes == {10 + p: p for p in range(5)}
    assert census.partition_sizes() == [50, 51, 52, 53, 54]
    assert census.val_sizes[0] == 6
    assert census.label_count_rows(CLASSES)[3][0] == 53
    assert census.missing() == []


def test_two_nodes_claiming_one_partition_are_a_conflict_blamed_on_neither() -> None:
    # An impostor answering as another client's partition: the server cannot tell which
    # node owns it, so neither takes part, and neither is counted as a rejected client.
    cfg = load_config(MNIST)
    census = tally([answer(1, 0), answer(2, 1), answer(3, 1)], cfg, KNOWN)
    assert census.nodes == {1: 0}
    assert census.missing() == [1, 2, 3, 4]
    assert census.partition_sizes() == [60, 0, 0, 0, 0]
    assert census.conflicts == [
        "nodes 2, 3 all claim partition 1: neither takes part (in a deployment, "
        "federation.node_ids binds each partition to its node)"
    ]
    assert census.notices.clients_line() == ""  # nobody blamed


def test_node_ids_bind_each_partition_to_its_node() -> None:
    # With SuperNode authentication, node ids are the registered keys': the impostor (node
    # 9, answering as partition 1) is refused and the owner (node 2) keeps its partition.
    cfg = load_config(MNIST, ["federation.node_ids=[1, 2, 3, 4, 5]"])
    census = tally([answer(1, 0), answer(2, 1), answer(9, 1)], cfg, KNOWN)
    assert census.nodes == {1: 0, 2: 1}
    assert census.conflicts == []
    assert "federation.node_ids gives node 2" in census.notices.clients_line()
    assert "node 9" in census.notices.clients_line()


def test_node_ids_hold_any_flower_node_id() -> None:
    big = 2**64 - 1  # Flower's node ids are unsigned 64-bit
    cfg = load_config(MNIST, [f"federation.node_ids=[{big}, 2, 3, 4, 5]"])
    assert cfg.federation.node_ids == (big, 2, 3, 4, 5)
    for bad in ("[1, 2]", "[1, 1, 2, 3, 4]", "[-1, 2, 3, 4, 5]", f"[{2**64}, 2, 3, 4, 5]"):
        with pytest.raises(ConfigError, match=r"federation\.node_ids"):
            load_config(MNIST, [f"federation.node_ids={bad}"])


def test_a_claim_must_be_the_size_the_split_gives_its_partition() -> None:
    # Every client cuts the same public copy of a built-in dataset: the server knows each
    # partition's sizes, so a client claiming others (to buy weight, or a DP-SGD plan of
    # its choosing) is refused.
    cfg = load_config(MNIST)
    known = Known(KNOWN.classes, ((54, 6),) * 5)
    liar = answer(2, 1, train=1, val=0, labels=[1] + [0] * (CLASSES - 1))
    inflated = answer(3, 2, train=540, labels=[540] + [0] * (CLASSES - 1))
    census = tally([answer(1, 0, train=54), liar, inflated], cfg, known)
    assert census.nodes == {1: 0}
    assert "partition 1 of this dataset holds 54 and 6" in census.notices.clients_line()
    # A site's own data (node config data-root) is not the server's copy: not checked.
    site = answer(4, 3, train=7, val=1, own=True, labels=[7] + [0] * (CLASSES - 1))
    assert census_problem(site, cfg, known) is None
    assert census_problem(answer(4, 3, own=1), cfg, known) is not None  # not a boolean


def test_failed_and_malformed_answers_are_said_and_skipped() -> None:
    cfg = load_config(MNIST)
    query = Message(RecordDict(), dst_node_id=4, message_type=CENSUS_MESSAGE_TYPE)
    failed = Message(Error(0, "Traceback ...\nValueError: no data here"), reply_to=query)
    odd = Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=query)
    census = tally([failed, odd, answer(1, 0)], cfg, KNOWN)
    assert census.nodes == {1: 0}
    assert census.notices.first == "a client failed the census: ValueError: no data here"


class CensusGrid:
    """Nodes 1-5 answer as partitions 0-4, or fail."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return [5, 4, 3, 2, 1]

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        self.sent = list(messages)
        if self.fail:
            return [Message(Error(0, "RuntimeError: down"), reply_to=m) for m in self.sent]
        return [answer(m.metadata.dst_node_id, m.metadata.dst_node_id - 1) for m in self.sent]


def test_take_census_asks_every_node_once() -> None:
    cfg = load_config(MNIST)
    grid = CensusGrid()
    census = take_census(grid, cfg, KNOWN)  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [1, 2, 3, 4, 5]
    assert {m.metadata.message_type for m in grid.sent} == {f"{MessageType.QUERY}.census"}
    assert census.nodes == {n: n - 1 for n in range(1, 6)}


def test_a_census_nobody_answers_ends_the_run_with_one_line() -> None:
    with pytest.raises(NothingTrained, match=r"no client answered the census.*RuntimeError: down"):
        take_census(CensusGrid(fail=True), load_config(MNIST), KNOWN)  # type: ignore[arg-type]


def test_a_census_short_of_nodes_says_what_it_waits_for(caplog: pytest.LogCaptureFixture) -> None:
    class TwoNodes:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    from fl_lightning.server.census import _connected

    with caplog.at_level("WARNING", logger="flwr"):
        nodes = _connected(TwoNodes(), wanted=3, timeout=0.6, patience=0.2)  # type: ignore[arg-type]
    assert nodes == [1, 2]
    said = [r.getMessage() for r in caplog.records if "census:" in r.getMessage()]
    assert len(said) == 1 and "2 of 3 SuperNodes connected" in said[0]
    assert "num-supernodes=3" in said[0]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_the_server_knows_the_sizes_honest_clients_claim(scheme: str, data_root: Path) -> None:
    from fl_lightning.client.training import census
    from fl_lightning.server.federation import _known

    overrides = [
        f"data.root={data_root}",
        "data.max_train_samples=1003",
        f"data.partition={scheme}",
    ]
    cfg = load_config(MNIST, [*overrides, "federation.num_clients=7"])
    claimed = tuple(census(cfg, p, 7, with_labels=False)[:2] for p in range(7))
    assert _known(cfg).sizes == claimed
