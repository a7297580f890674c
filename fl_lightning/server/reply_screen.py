"""Client replies before anything of them is used: each one screened completely, hostile or not.

A failed client (it raised, timed out or dropped out) is counted as a failure. A reply
that could not come from an honest client is rejected, counted and left out: the whole
reply is checked before any of it is read, namely

- its record structure (exactly the records its stage sends, nothing else);
- its identity: a `partition-id` in range, equal to the partition its node answered the
  census with (`fl_lightning.server.census`), and one reply per partition;
- its metrics: the stage's reserved keys and exactly the module's metric names of the run
  (the set more than half of the partitions sent; before that, the set most of the
  round's replies carry), each a finite number; `num-examples` an integer between 1
  and the partition's size from the census; `uniform-weight` 1;
- its arrays: the DECODED values (not the declared shape and dtype) of exactly the
  model's keys, shapes and dtypes, all finite.

Nothing here raises for any reply: whatever a client sends becomes a reason string.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SType

from fl_lightning.config.schema import Config
from fl_lightning.errors import show
from fl_lightning.privacy.accountant_state import accountant_state_problem
from fl_lightning.server.checks import (
    error_summary,
    is_int,
    is_metric_name,
    is_number,
    partition_of,
)
from fl_lightning.vocabulary import (
    ACCOUNTANT_RECORD,
    CLIENT_SECONDS,
    EPSILON_METRIC,
    IDENTITY_RECORD,
    MAX_METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    RESERVED_METRICS,
    SCAFFOLD_RECORD,
    UNIFORM_WEIGHT,
)

if TYPE_CHECKING:
    from fl_lightning.server.census import Census

TRAIN, EVALUATE, BATCHNORM = "train", "evaluate", "batchnorm statistics"
# numpy's own bound on a .npy header (np.lib.format's default max_header_size).
_MAX_NPY_HEADER = 10_000
# What numpy's .npy reader raises on bytes that are not a well-formed array of a plain dtype.
_DECODE_ERRORS = (ValueError, TypeError, EOFError, OSError, SyntaxError, RecursionError)


@dataclass(frozen=True)
class Screened:
    """The replies a round uses, in partition order, and what was left out."""

    valid: list[Message]
    failures: int
    rejected: int


def identity_problem(reply: Message, census: Census) -> str | None:
    """Why `reply`'s identity is not its node's partition of the census; None if it is."""
    record = reply.content.config_records.get(IDENTITY_RECORD)
    if record is None or set(record.keys()) != {PARTITION_ID}:
        return f"its {IDENTITY_RECORD!r} record is not exactly {{'partition-id'}}"
    partition = record[PARTITION_ID]
    if not is_int(partition) or not 0 <= partition < census.num_clients:  # type: ignore[operator]
        return f"partition-id {show(partition)} is not an integer in 0..{census.num_clients - 1}"
    node = reply.metadata.src_node_id
    bound = census.nodes.get(node)
    if bound is None:
        return f"node {node} has no partition (it did not answer the census, or shared one)"
    if bound != partition:
        return f"it claims partition {show(partition)}, its node answered the census as {bound}"
    return None


def decode(array: Array, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | str:
    """The values `array` decodes to if they are an array of `shape` and `dtype`, else why not.

    The .npy header is read before numpy decodes anything: numpy would allocate whatever
    shape a header declares before finding the bytes missing.
    """
    if array.stype != SType.NUMPY:
        return f"serialization type {show(array.stype)} is not {SType.NUMPY!r}"
    if array.dtype != str(dtype) or array.shape != shape:
        return f"declared {array.dtype} {array.shape}, the model's is {dtype} {shape}"
    data = array.data
    if not isinstance(data, bytes) or len(data) > shape_bytes(shape, dtype) + _MAX_NPY_HEADER:
        return "its data is not the bytes of one array of the model's size"
    buffer = BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version not in ((1, 0), (2, 0)):
            return f".npy format version {version} is not supported"
        read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
        real_shape, _, real_dtype = read_header(buffer, max_header_size=_MAX_NPY_HEADER)
        if real_shape != shape or real_dtype != dtype:
            return f"its bytes hold {real_dtype} {real_shape}, the model's is {dtype} {shape}"
        if len(data) - buffer.tell() != shape_bytes(shape, dtype):
            return f"its bytes hold {len(data) - buffer.tell()} bytes of values, not as declared"
        values = array.numpy()
    except _DECODE_ERRORS as err:
        return f"its bytes are not a .npy array ({type(err).__name__}: {err})"
    if not isinstance(values, np.ndarray) or values.shape != shape or values.dtype != dtype:
        return "its bytes do not decode to an array of the model's shape and dtype"
    return values


def _names(keys: Iterable[object], limit: int = 8) -> str:
    """Some of a client's record or array names, sorted, for a one-line reason."""
    names = sorted(str(key)[:40] for key, _ in zip(keys, range(limit), strict=False))
    return show(names)


def shape_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """How many bytes an array of `shape` and `dtype` holds."""
    return math.prod(shape) * dtype.itemsize


def arrays_problem(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why `arrays` cannot be aggregated into the global model `reference`; None if it can."""
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        unexpected = _names(set(arrays.keys()) - set(reference.keys()))
        return f"its arrays do not match the model's (missing {missing}, unexpected {unexpected})"
    for key, expected in reference.items():
        shape = tuple(int(d) for d in expected.shape)
        values = decode(arrays[key], shape, np.dtype(expected.dtype))
        if isinstance(values, str):
            return f"{key}: {values}"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{key} contains {int((~np.isfinite(values)).sum())} NaN/Inf values"
        # A variance below zero is finite but breaks BatchNorm (the square root of it).
        if str(key).endswith(".running_var") and (values < 0).any():
            return f"{key} contains {int((values < 0).sum())} negative variances"
    return None


def control_problem(reply: Message, control: ArrayRecord | None) -> str | None:
    """SCAFFOLD: why the change of the client's control variate cannot be used (it must
    match the server's `control`, array by array); None if it can, or if there is none."""
    if SCAFFOLD_RECORD not in reply.content.array_records:
        return None  # _records_problem requires it where SCAFFOLD runs
    if control is None:
        return "there is no server control variate to check its change against"
    problem = arrays_problem(reply.content.array_records[SCAFFOLD_RECORD], control)
    return problem and f"its control variate's change: {problem}"


def _records_problem(reply: Message, stage: str, cfg: Config) -> str | None:
    """Why the reply's records are not exactly those its stage sends; None if they are."""
    content = reply.content
    configs = {IDENTITY_RECORD}
    if stage == TRAIN and cfg.privacy.mode == "dp_sgd":
        configs.add(ACCOUNTANT_RECORD)  # the client's accountant, kept for --resume
    arrays = set() if stage == EVALUATE else {"arrays"}
    if stage == TRAIN and cfg.strategy.name == "scaffold":
        arrays.add(SCAFFOLD_RECORD)  # the change of the client's control variate
    expected = (
        arrays,
        {"metrics"},
        configs,
    )
    found = (
        set(content.array_records.keys()),
        set(content.metric_records.keys()),
        set(content.config_records.keys()),
    )
    if found != expected:
        names = ("array", "metric", "config")
        wrong = [
            f"{name} records {_names(f)} instead of {sorted(e)}"
            for name, f, e in zip(names, found, expected, strict=True)
            if f != e
        ]
        return "it carries " + "; ".join(wrong)
    if ACCOUNTANT_RECORD in configs:
        record = content.config_records[ACCOUNTANT_RECORD]
        state = record.get("state")
        if set(record.keys()) != {"state"} or not isinstance(state, str):
            return f"its {ACCOUNTANT_RECORD!r} record is not one 'state' string"
        problem = accountant_state_problem(state)  # the check --resume makes of it too
        if problem is not None:
            return f"its accountant state {problem}"
    return None


def reserved_metrics(stage: str, cfg: Config) -> set[str]:
    """The metric keys of our own a reply of `stage` carries, exactly."""
    keys = {NUM_EXAMPLES, UNIFORM_WEIGHT}
    if stage == TRAIN and cfg.privacy.mode == "dp_sgd":
        keys.add(EPSILON_METRIC)
    return keys


def module_metric_names(metrics: Any) -> frozenset[str]:
    """The names of the module's own metrics in a reply's metric record."""
    return frozenset(str(k) for k in metrics if k not in RESERVED_METRICS)


def metrics_problem(
    metrics: Any, stage: str, cfg: Config, cap: int, names: frozenset[str] | None = None
) -> str | None:
    """Why a reply's metrics are not its stage's, finite and in range; None if they are.

    `cap` is the partition's size from the census: the most examples a reply can weigh.
    `names` are the module's metric names the run expects (None: not known yet).
    """
    keys = set(metrics.keys())
    reserved = reserved_metrics(stage, cfg)
    allowed = reserved | (set(CLIENT_SECONDS) if stage == TRAIN else set())
    if not reserved <= keys or keys & set(RESERVED_METRICS) - allowed:
        missing = sorted(reserved - keys)
        unexpected = sorted(keys & set(RESERVED_METRICS) - allowed)
        return f"its metrics are not its stage's (missing {missing}, unexpected {unexpected})"
    found = module_metric_names(metrics)
    if stage == BATCHNORM:
        names = frozenset()
    if len(found) > MAX_METRICS:
        return f"it carries {len(found)} metrics, more than {MAX_METRICS}"
    for name in found:
        if not is_metric_name(name):
            return f"metric name {show(name[:40])}... is not a short printable name"
    if names is not None and found != names:
        missing = sorted(names - found)
        unexpected = sorted(found - names)
        return f"its metrics are not the run's (missing {missing}, unexpected {unexpected})"
    for key, value in metrics.items():
        if not is_number(value):
            return f"metric {key} is {show(value)}, not a finite number"
        # The built-in modules' accuracies are shares; a user's may be percentages.
        if cfg.model.class_path is None and key.endswith("accuracy") and not 0 <= value <= 1:
            return f"metric {key} is {show(value)}, outside [0, 1]"
        if key == EPSILON_METRIC and value < 0:
            return f"metric {key} is {show(value)}, negative"
        timeout = cfg.federation.round_timeout  # no honest client works longer than a round
        if key in CLIENT_SECONDS and not 0 <= value <= timeout:
            return f"metric {key} is {show(value)}, outside [0, {timeout:g}] seconds"
    examples = metrics[NUM_EXAMPLES]
    if not is_int(examples) or not 0 < examples <= cap:
        return (
            f"num-examples is {show(examples)}, not an integer in 1..{cap} (its partition's size)"
        )
    if metrics[UNIFORM_WEIGHT] != 1:
        return f"{UNIFORM_WEIGHT} is {show(metrics[UNIFORM_WEIGHT])}, not 1"
    return None


class ReplyScreen:
    """Screens replies against the run's config, the census and the global model."""

    def __init__(self, cfg: Config, census: Census) -> None:
        self.cfg = cfg
        self.census = census
        self.notices = census.notices  # shared with the census: each problem said once
        # The module's metric names in each stage's replies, once more than half of the
        # partitions have sent the same set (`_by_metric_names`); then required of every one.
        self.metric_names: dict[str, frozenset[str]] = {}
        self._votes: dict[str, dict[int, frozenset[str]]] = {}  # stage -> partition -> names
        self.control: ArrayRecord | None = None  # SCAFFOLD: the round's server control variate

    def state(self) -> dict[str, Any]:
        """The run's metric names so far, agreed and voted for, as plain data (for --resume)."""
        return {
            "agreed": {stage: sorted(names) for stage, names in self.metric_names.items()},
            "votes": {
                stage: {partition: sorted(names) for partition, names in votes.items()}
                for stage, votes in self._votes.items()
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a killed run: a resumed run requires the names it did."""
        self.metric_names = {stage: frozenset(names) for stage, names in state["agreed"].items()}
        self._votes = {
            stage: {partition: frozenset(names) for partition, names in votes.items()}
            for stage, votes in state["votes"].items()
        }

    def problem(
        self, reply: Message, stage: str, reference: ArrayRecord | None = None
    ) -> str | None:
        """Why a (non-failed) reply of `stage` cannot be used; None if it can.

        `reference` holds the arrays the reply must match (the global model, or its
        BatchNorm statistics); a stage that sends arrays is refused without one.
        """
        problem = _records_problem(reply, stage, self.cfg) or identity_problem(reply, self.census)
        if problem is not None:
            return problem
        partition = partition_of(reply)
        assert partition is not None  # identity_problem checked it
        sizes = self.census.val_sizes if stage == EVALUATE else self.census.train_sizes
        cap = sizes.get(partition, 0)
        problem = metrics_problem(
            reply.content.metric_records["metrics"],
            stage,
            self.cfg,
            cap,
            self.metric_names.get(stage),
        )
        if problem is not None or stage == EVALUATE:
            return problem
        if reference is None:
            return "there is no global model to check its arrays against"
        problem = arrays_problem(reply.content.array_records["arrays"], reference)
        return problem or control_problem(reply, self.control)

    def screen(
        self,
        replies: Iterable[Message],
        stage: str,
        reference: ArrayRecord | None = None,
        taken: set[int] | None = None,
    ) -> Screened:
        """Count failed replies, reject unusable ones; the rest in partition order.

        `taken` holds the partitions already used this round (and gets this call's): a
        second reply for one of them is rejected.
        """
        taken = set() if taken is None else taken
        valid: list[Message] = []
        failures = rejected = 0
        for reply in replies:
            if reply.has_error():
                failures += 1
                self.notices.say(
                    f"a client failed in {stage}",
                    error_summary(reply.error.reason),
                    who=self.who(reply),
                )
                continue
            problem = self.problem(reply, stage, reference)
            partition = partition_of(reply)
            if problem is None and partition in taken:
                problem = f"a second reply for partition {partition} this round"
            if problem is not None:
                rejected += 1
                self.reject(reply, stage, problem)
                continue
            assert partition is not None
            taken.add(partition)
            valid.append(reply)
        if stage not in self.metric_names and valid:
            kept = self._by_metric_names(stage, valid)
            kept_ids = {id(reply) for reply in kept}
            rejected += len(valid) - len(kept)
            taken.difference_update(partition_of(r) for r in valid if id(r) not in kept_ids)
            valid = kept
        # Sorted by partition: float sums then do not depend on arrival order.
        return Screened(sorted(valid, key=lambda r: partition_of(r) or 0), failures, rejected)

    def _by_metric_names(self, stage: str, valid: list[Message]) -> list[Message]:
        """The replies carrying the round's metric names; the run's names once most agree.

        Each partition votes with the names it sent last. A name set voted for by more than
        half of the census's partitions becomes the run's, required of every reply from
        then on: fewer than half of the clients cannot choose it. Until then a round keeps
        the set most of its replies carry (Flower averages one set of names), ties going to
        the larger set, and a client sending another is left out of that round only.
        """
        sets = [module_metric_names(r.content.metric_records["metrics"]) for r in valid]
        votes = self._votes.setdefault(stage, {})
        for reply, names in zip(valid, sets, strict=True):
            votes[partition_of(reply) or 0] = names
        tally = Counter(votes.values())
        leader = max(tally, key=lambda n: (tally[n], len(n), sorted(n)))
        if tally[leader] * 2 > len(self.census.nodes):
            self.metric_names[stage] = leader
        this_round = Counter(sets)
        names = self.metric_names.get(stage) or max(
            this_round, key=lambda n: (this_round[n], len(n), sorted(n))
        )
        kept = []
        for reply, found in zip(valid, sets, strict=True):
            if found == names:
                kept.append(reply)
                continue
            problem = (
                f"its metrics are not the round's (missing {sorted(names - found)}, "
                f"unexpected {sorted(found - names)})"
            )
            self.reject(reply, stage, problem)
        return kept

    def who(self, reply: Message) -> str:
        """The client a reply came from, by the partition its node holds in the census."""
        node = reply.metadata.src_node_id
        partition = self.census.nodes.get(node)
        return f"node {node}" if partition is None else f"client {partition}"

    def reject(self, reply: Message, stage: str, problem: str) -> None:
        """Say once why a reply of `stage` is left out, counted against its client."""
        who = self.who(reply)
        self.notices.say(f"{stage} reply of {who} rejected", problem, who=who)


def weights(replies: Iterable[Message]) -> np.ndarray:
    """The screened replies' `num-examples`, normalised to sum to 1."""
    counts = np.array(
        [int(r.content.metric_records["metrics"]["num-examples"]) for r in replies],  # type: ignore[arg-type]
        dtype=np.float64,
    )
    return counts / counts.sum()
