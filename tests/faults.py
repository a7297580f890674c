"""Fault-injecting Flower mods, for tests and benchmarks/faults.py only.

They reach a simulation through `run_simulation(..., client_mods=[...])`, a test hook: no
config key turns them on. Each acts on the clients whose partition id it names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _train_arrays_mod(
    partitions: Collection[int], change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
) -> Mod:
    """A mod that rewrites the arrays of the named clients' train replies with `change`."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or _partition(context) not in partitions:
            return reply
        arrays = reply.content.array_records["arrays"]
        changed = change({key: array.numpy() for key, array in arrays.items()})
        reply.content["arrays"] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in changed.items()}
        )
        return reply

    return mod


def raising(partitions: Collection[int], message_types: Collection[str] | None = None) -> Mod:
    """The named clients raise in every message (the census included), or in those of
    `message_types` only (e.g. [MessageType.TRAIN]: they answer the census, fail training)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        wanted = message_types is None or msg.metadata.message_type in message_types
        if _partition(context) in partitions and wanted:
            raise RuntimeError(f"injected failure in client {_partition(context)}")
        return call_next(msg, context)

    return mod


def nan_weights(partitions: Collection[int]) -> Mod:
    """The named clients reply with NaN in their first weight array."""

    def change(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating))
        return {**arrays, first: np.full_like(arrays[first], np.nan)}

    return _train_arrays_mod(partitions, change)


def wrong_shapes(partitions: Collection[int]) -> Mod:
    """The named clients reply with their first weight array cut in half."""

    def change(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(arrays))
        return {**arrays, first: arrays[first][: max(1, len(arrays[first]) // 2)]}

    return _train_arrays_mod(partitions, change)


def scaled(partitions: Collection[int], factor: float) -> Mod:
    """The named clients reply with their weights multiplied by `factor` (model poisoning)."""

    def change(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            k: (v * factor).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in arrays.items()
        }

    return _train_arrays_mod(partitions, change)


def random_weights(partitions: Collection[int], std: float, seed: int = 0) -> Mod:
    """The named clients reply with Gaussian noise of this std instead of their weights."""

    def change(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            k: rng.normal(0.0, std, v.shape).astype(v.dtype)
            if np.issubdtype(v.dtype, np.floating)
            else v
            for k, v in arrays.items()
        }

    return _train_arrays_mod(partitions, change)


def stalling(partitions: Collection[int], seconds: float) -> Mod:
    """The named clients take `seconds` longer to answer train messages (a timeout)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and _partition(context) in partitions:
            time.sleep(seconds)
        return call_next(msg, context)

    return mod
