"""Malicious-client replies, for tests only: each attack rewrites an honest reply's records.

An attack is a function of a reply's RecordDict (changed in place). Tests apply them to
crafted replies (tests/test_reply_screen.py) or, through `attacking`, to the replies of real
simulated clients (a Flower mod reached through `client_mods`, like tests/faults.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from io import BytesIO

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import SType

Attack = Callable[[RecordDict], None]


def _npy(values: np.ndarray) -> bytes:
    buffer = BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _first_float(content: RecordDict) -> tuple[str, Array]:
    arrays = content.array_records["arrays"]
    key = next(k for k, a in arrays.items() if np.issubdtype(np.dtype(a.dtype), np.floating))
    return key, arrays[key]


def metric(key: str, value: object) -> Attack:
    """Set metric `key` (num-examples, uniform-weight, an extra one...) to `value`."""

    def attack(content: RecordDict) -> None:
        content.metric_records["metrics"][key] = value  # type: ignore[assignment]

    return attack


def missing_metric(key: str) -> Attack:
    """Leave metric `key` out."""

    def attack(content: RecordDict) -> None:
        del content.metric_records["metrics"][key]

    return attack


def partition_id(value: object) -> Attack:
    """Claim partition `value` (another client's, out of range, not an int...)."""

    def attack(content: RecordDict) -> None:
        content.config_records["client"]["partition-id"] = value  # type: ignore[assignment]

    return attack


def no_partition_id(content: RecordDict) -> None:
    """Send no identity record at all."""
    del content["client"]


def scalar_as_array(content: RecordDict) -> None:
    """Declare the first weight array's shape and dtype, carry one scalar (broadcast attack)."""
    key, array = _first_float(content)
    data = _npy(np.array(1e3, dtype=np.float32))
    replaced = Array(dtype=array.dtype, shape=array.shape, stype=SType.NUMPY, data=data)
    content.array_records["arrays"][key] = replaced


def float64_as_float32(content: RecordDict) -> None:
    """Declare float32, carry float64 1e300 of the same shape (the aggregate would be inf)."""
    key, array = _first_float(content)
    data = _npy(np.full(array.shape, 1e300, dtype=np.float64))
    replaced = Array(dtype=array.dtype, shape=array.shape, stype=SType.NUMPY, data=data)
    content.array_records["arrays"][key] = replaced


def unknown_stype(content: RecordDict) -> None:
    """Keep the bytes, name a serialization nobody decodes."""
    key, array = _first_float(content)
    replaced = Array(dtype=array.dtype, shape=array.shape, stype="torch.pickle", data=array.data)
    content.array_records["arrays"][key] = replaced


def garbage_bytes(content: RecordDict) -> None:
    """Declare the right array, send bytes that are no .npy file."""
    key, array = _first_float(content)
    replaced = Array(dtype=array.dtype, shape=array.shape, stype=SType.NUMPY, data=b"\x93NUMPYxx")
    content.array_records["arrays"][key] = replaced


def extra_record(content: RecordDict) -> None:
    """Add a ConfigRecord the stage does not send."""
    content["extra"] = ConfigRecord({"hello": 1})


def weights(value: float) -> Attack:
    """Every floating-point weight `value`: finite, well-formed, and far from honest."""

    def attack(content: RecordDict) -> None:
        arrays = content.array_records["arrays"]
        for key, array in list(arrays.items()):
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating):
                arrays[key] = Array(np.full_like(values, value))

    return attack


def census_claim(**claim: object) -> Attack:
    """A census answer claiming other things: `partition=` another id, `train=` a size."""

    def attack(content: RecordDict) -> None:
        if "partition" in claim:
            content.config_records["client"]["partition-id"] = claim["partition"]  # type: ignore[assignment]
        record = content.config_records["census"]
        if "train" in claim:
            record["train-size"] = claim["train"]  # type: ignore[assignment]
            if "label-counts" in record:  # kept consistent, so only the size is a lie
                counts = [0] * len(record["label-counts"])  # type: ignore[arg-type]
                counts[0] = claim["train"]  # type: ignore[call-overload]
                record["label-counts"] = counts  # type: ignore[assignment]

    return attack


def failing_with(partitions: Collection[int], text: str) -> Mod:
    """The named clients raise RuntimeError(`text`) in every message, the census included."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if int(context.node_config["partition-id"]) in partitions:
            raise RuntimeError(text)
        return call_next(msg, context)

    return mod


def attacking(
    partition: int,
    train: Mapping[int, Attack],
    evaluate: Mapping[int, Attack],
    census: Attack | None = None,
) -> Mod:
    """A mod: client `partition` applies `train[round]` / `evaluate[round]` to its replies,
    and `census` to its census answer.

    The round is the `server-round` the server's message carries.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != partition or reply.has_error():
            return reply
        if msg.metadata.message_type == "query.census":
            if census is not None:
                census(reply.content)
            return reply
        attacks = {"train": train, "evaluate": evaluate}.get(msg.metadata.message_type)
        if attacks is None:  # other queries are answered honestly
            return reply
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        if server_round in attacks:
            attacks[server_round](reply.content)
        return reply

    return mod


def every_round(attack: Attack, rounds: Collection[int]) -> dict[int, Attack]:
    """The same attack in each of `rounds`."""
    return dict.fromkeys(rounds, attack)
