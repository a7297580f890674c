"""The census: at the start of every run the server asks every node what it holds.

Each client answers with its partition id, the sizes of its training and validation
samples and, only when neither differential privacy nor secure aggregation is on, its
training-label counts, counted by the client on its own partition. From the answers the
server binds each node to its partition (every later reply from that node must carry
it), takes the sizes as the most examples a reply can weigh, sizes the privacy ledger
and SecAgg+'s weights, and draws the label histogram: it never opens a client's data for that.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_lightning.config.schema import Config, sends_label_counts
from fl_lightning.errors import NothingTrained, show
from fl_lightning.server.checks import Notices, error_summary, is_int, partition_of
from fl_lightning.vocabulary import (
    CENSUS_ACTION,
    CENSUS_RECORD,
    IDENTITY_RECORD,
    LABEL_COUNTS,
    OWN_DATA,
    PARTITION_ID,
    TRAIN_SIZE,
    VAL_SIZE,
)

CENSUS_MESSAGE_TYPE = f"{MessageType.QUERY}.{CENSUS_ACTION}"


@dataclass(frozen=True)
class Known:
    """What the server knows of the clients' data (a built-in dataset cut into partitions).

    `classes` are the dataset's class names (what label counts count); `sizes` each
    partition's (training, validation) sizes, from the same split the clients make of the
    same public copy (`partition.client_splits`). A site's own data, or a DataModule's, is
    nothing the server knows.
    """

    classes: tuple[str, ...] = ()
    sizes: tuple[tuple[int, int], ...] | None = None


@dataclass
class Census:
    """What the clients told the server: node id -> partition, each partition's sizes."""

    num_clients: int
    nodes: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    train_sizes: dict[int, int] = field(default_factory=dict)  # partition id -> samples
    val_sizes: dict[int, int] = field(default_factory=dict)
    label_counts: dict[int, list[int]] = field(default_factory=dict)  # only when sent
    notices: Notices = field(default_factory=Notices)
    # Claims the server cannot settle (two nodes, one partition): said once, for summary.md.
    conflicts: list[str] = field(default_factory=list)

    def missing(self) -> list[int]:
        """Partitions no node is bound to (no answer, a bad one, or claimed twice)."""
        return [p for p in range(self.num_clients) if p not in self.train_sizes]

    def partition_sizes(self, fill: int = 0) -> list[int]:
        """Each partition's training-sample count, `fill` for a partition nobody holds."""
        return [self.train_sizes.get(p, fill) for p in range(self.num_clients)]

    def label_count_rows(self, num_classes: int) -> list[list[int]]:
        """Each partition's label counts (zeros for one that sent none)."""
        return [self.label_counts.get(p, [0] * num_classes) for p in range(self.num_clients)]

    def conflict(self, text: str) -> None:
        """A claim the server cannot settle: said once, blamed on nobody, kept for summary.md."""
        self.conflicts.append(text)
        self.notices.say("census conflict", text)


def census_problem(reply: Message, cfg: Config, known: Known | None = None) -> str | None:
    """Why a (non-failed) census reply cannot be believed; None if it can.

    A claim of other sizes than the split gives its partition would buy its sender the
    weight (or, under DP-SGD, the privacy plan) of samples that do not exist; a site's own
    data cannot be checked. With `federation.node_ids`, a partition is claimed only by the
    node it names.
    """
    known = known or Known()
    content = reply.content
    found = (set(content.array_records), set(content.metric_records), set(content.config_records))
    if found != (set(), set(), {IDENTITY_RECORD, CENSUS_RECORD}):
        return f"it carries the records {show(sorted(map(str, set().union(*found)))[:8])}"
    if set(content.config_records[IDENTITY_RECORD].keys()) != {PARTITION_ID}:
        return f"its {IDENTITY_RECORD!r} record is not exactly {{'partition-id'}}"
    partition = partition_of(reply)
    if partition is None or not 0 <= partition < cfg.federation.num_clients:
        return f"its partition-id is not an integer in 0..{cfg.federation.num_clients - 1}"
    owner = cfg.federation.node_ids
    if owner is not None and owner[partition] != reply.metadata.src_node_id:
        return (
            f"it claims partition {partition}, which federation.node_ids gives node "
            f"{owner[partition]}"
        )
    record = content.config_records[CENSUS_RECORD]
    keys = {TRAIN_SIZE, VAL_SIZE, OWN_DATA} | ({LABEL_COUNTS} if sends_label_counts(cfg) else set())
    if set(record.keys()) != keys:
        held = show(sorted(map(str, record.keys()))[:8])
        return f"its census record holds {held}, not {sorted(keys)}"
    train, val, own = record[TRAIN_SIZE], record[VAL_SIZE], record[OWN_DATA]
    if not is_int(train) or train < 1 or not is_int(val) or val < 0 or not isinstance(own, bool):  # type: ignore[operator]
        return (
            f"{TRAIN_SIZE} {show(train)}, {VAL_SIZE} {show(val)} and {OWN_DATA} {show(own)} are "
            "not two counts of samples and a boolean"
        )
    if known.sizes is not None and not own and (train, val) != known.sizes[partition]:
        expected = known.sizes[partition]
        return (
            f"it claims {show(train)} training and {show(val)} validation samples; partition "
            f"{partition} of this dataset holds {expected[0]} and {expected[1]}"
        )
    return _label_counts_problem(record, keys, train, known)


def _label_counts_problem(record: Any, keys: set[str], train: object, known: Known) -> str | None:
    """Why a census record's label counts are not the dataset's classes summing to `train`."""
    if LABEL_COUNTS not in keys:
        return None
    counts = record[LABEL_COUNTS]
    if (
        not isinstance(counts, list)
        or len(counts) != len(known.classes)
        or not all(is_int(c) and c >= 0 for c in counts)
        or sum(counts) != train
    ):
        return (
            f"its label counts are not {len(known.classes)} counts summing to {TRAIN_SIZE} "
            f"{show(train)}"
        )
    return None


def tally(replies: Iterable[Message], cfg: Config, known: Known | None = None) -> Census:
    """The census from its replies: bad ones said and dropped, conflicts said and unbound.

    A partition two nodes claim is a conflict: neither is bound (the server cannot tell
    the owner from the impostor), and neither is blamed for it.
    """
    census = Census(cfg.federation.num_clients)
    claims: dict[int, list[Message]] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            census.notices.say(
                "a client failed the census", error_summary(reply.error.reason), who=f"node {node}"
            )
            continue
        problem = census_problem(reply, cfg, known)
        if problem is not None:
            census.notices.say(f"census reply of node {node} rejected", problem, who=f"node {node}")
            continue
        claims.setdefault(partition_of(reply) or 0, []).append(reply)
    for partition, claimants in sorted(claims.items()):
        nodes = sorted({reply.metadata.src_node_id for reply in claimants})
        if len(nodes) > 1:
            census.conflict(
                f"nodes {', '.join(map(str, nodes))} all claim partition {partition}: neither "
                "takes part (in a deployment, federation.node_ids binds each partition to "
                "its node)"
            )
            continue
        record = claimants[0].content.config_records[CENSUS_RECORD]
        census.nodes[nodes[0]] = partition
        census.train_sizes[partition] = int(record[TRAIN_SIZE])  # type: ignore[arg-type]
        census.val_sizes[partition] = int(record[VAL_SIZE])  # type: ignore[arg-type]
        if LABEL_COUNTS in record:
            census.label_counts[partition] = [int(c) for c in record[LABEL_COUNTS]]  # type: ignore[union-attr]
    return census


def take_census(grid: Grid, cfg: Config, known: Known | None = None) -> Census:
    """Ask every node (once `federation.num_clients` are connected) what it holds.

    Raises NothingTrained when no partition could be bound: no round could use a reply.
    """
    fed = cfg.federation
    nodes = _connected(grid, fed.num_clients, fed.round_timeout)
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=CENSUS_MESSAGE_TYPE) for node in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=fed.round_timeout)
    census = tally(replies, cfg, known)
    if not census.nodes:
        raise NothingTrained(nothing_trained("no client answered the census", census.notices))
    if census.missing():
        log(WARNING, "census: no node holds partitions %s: they take no part", census.missing())
    return census


def nothing_trained(what: str, notices: Notices) -> str:
    """The one line a run that trained nothing ends with: what happened, which clients
    failed or were rejected and why (or the first problem), what to do."""
    clients = notices.clients_line()
    said = (
        f"the clients' problems: {clients}"
        if clients
        else f"the clients' first problem: {notices.first or 'no client reported an error'}"
    )
    return (
        f"{what}, so nothing was trained; {said}. Fix that (--verbose shows Flower's and "
        "Ray's full logs) and run again"
    )


def _connected(grid: Grid, wanted: int, timeout: float, patience: float = 10.0) -> list[int]:
    """The connected node ids, once `wanted` are (or `timeout` seconds have passed).

    SuperNodes may join a deployment late, so the census waits; after `patience` seconds
    it says once what it waits for, or a run started with too few nodes looks hung.
    """
    start = time.monotonic()
    said = False
    while len(nodes := list(grid.get_node_ids())) < wanted:
        waited = time.monotonic() - start
        if waited >= timeout:
            break
        if waited >= patience and not said:
            said = True
            log(
                WARNING,
                "census: %d of %d SuperNodes connected; waiting up to %.0f s "
                "(federation.round_timeout) for the rest. Start one SuperNode per client "
                '(flwr run: --federation-config "num-supernodes=%d")',
                len(nodes),
                wanted,
                timeout,
                wanted,
            )
        time.sleep(0.2)  # the Simulation Engine registers its nodes as the ServerApp starts
    return sorted(nodes)
