"""A strategy's cross-round state as tensors and plain data, and back, checked, per attribute.

`strategy_state` copies what a strategy keeps across rounds (FedAdam's moments, FedAvgM's
momentum, DP-SGD clients' accountants) into what `torch.load(weights_only=True)` can read
back; `decode_strategy_state` rebuilds each attribute with the type its Flower class keeps
it in, after checking it against the model's arrays and the number of clients. resume.py
stores the one in resume.pt and loads the other from it. The small checks of plain data
(`expect`, `is_tensor`, ...) live here because both modules need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.serverapp.strategy.fedopt import FedOpt

from fl_lightning.privacy.accountant_state import accountant_state_problem


class Malformed(Exception):
    """What is wrong with a part of resume.pt (one fragment of the one-line refusal)."""


class _Frame(NamedTuple):
    """What a strategy attribute is checked against: the model's arrays and the clients."""

    weights: dict[str, torch.Tensor]
    num_clients: int


@dataclass(frozen=True)
class _Field:
    """How one strategy attribute is kept in resume.pt."""

    owner: type  # the Flower class that keeps it (with every subclass)
    encode: Callable[[Any], Any]  # the attribute -> tensors and plain data
    decode: Callable[[Any, _Frame, str], Any]  # back, checked; raises Malformed


def strategy_state(strategy: object) -> dict[str, Any]:
    """A copy of the strategy's cross-round state as tensors and plain data (`_FIELDS`)."""
    state = {}
    for name, field in _fields_of(type(strategy)).items():
        value = getattr(strategy, name, None)
        if value is not None:
            state[name] = field.encode(value)
    return state


def load_strategy_state(
    strategy: object, state: Any, weights: dict[str, torch.Tensor], num_clients: int
) -> None:
    """Set `strategy`'s attributes from `strategy_state`'s output, each rebuilt with its
    own type (`decode_strategy_state`); raises Malformed."""
    for name, value in decode_strategy_state(type(strategy), state, weights, num_clients).items():
        setattr(strategy, name, value)


def decode_strategy_state(
    cls: type, state: Any, weights: dict[str, torch.Tensor], num_clients: int
) -> dict[str, Any]:
    """`strategy_state`'s output back as a `cls` keeps each attribute; raises Malformed.

    `weights` are the model's arrays (names, shapes, order), `num_clients` bounds the
    partition ids accountants are kept by.
    """
    expect(isinstance(state, dict), "strategy: not a strategy's state")
    fields = _fields_of(cls)
    for name in state:
        expect(name in fields, f"strategy: holds {str(name)[:40]!r}, not kept by {cls.__name__}")
    frame = _Frame(weights, num_clients)
    return {
        name: fields[name].decode(value, frame, f"strategy.{name}") for name, value in state.items()
    }


# What each Flower strategy (flwr 1.42, flwr/serverapp/strategy) keeps across rounds beyond
# its constructor's arguments, and the type it keeps it in:
#   FedOpt (FedAdam, FedYogi, FedAdagrad): m_t, v_t: dict[str, NDArray] | None (0-d
#     entries are NumPy scalars). Its current_arrays is set from the global arrays in
#     every configure_train before it is read: not kept.
#   FedAvgM: current_arrays: ArrayRecord | None (the model its momentum steps from, in the
#     model's key order); momentum_vector: list[NDArray] | None, in that order.
#   LightningFedAvg (every strategy of fl-lightning): accountants: dict[int, str], each
#     DP-SGD client's accountant as JSON, by partition id.
#   FedProx, FedMedian, FedTrimmedAvg, Krum: nothing more.


# Attributes Flower's server optimizers (FedAdam, FedYogi, FedAdagrad, FedAvgM) rebind as
# they aggregate: put back when their aggregate is refused, so one bad round does not
# poison the next ones.
_SERVER_OPTIMIZER_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")


def optimizer_snapshot(strategy: object) -> dict[str, Any]:
    """The server optimizer's attributes as they are before an aggregation (not copied:
    Flower rebinds them rather than changing them in place; None where not yet set)."""
    return {name: getattr(strategy, name, None) for name in _SERVER_OPTIMIZER_STATE}


def restore_snapshot(strategy: object, snapshot: dict[str, Any]) -> None:
    """Put `optimizer_snapshot`'s attributes back (a refused aggregate leaves no trace)."""
    for name, value in snapshot.items():
        if hasattr(strategy, name):
            setattr(strategy, name, value)


def unsound_optimizer_state(strategy: object) -> str | None:
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


def _tensor(array: Any) -> torch.Tensor:
    """A copy of a NumPy array or scalar as a tensor (0-d for a scalar)."""
    return torch.from_numpy(np.array(array))


def _array(value: Any, shape: torch.Size, where: str) -> Any:
    """A tensor of `shape` as a NumPy array (a NumPy scalar if 0-d, as Flower's math makes)."""
    expect(is_tensor(value) and not value.is_complex(), f"{where}: not a real tensor")
    expect(value.shape == shape, f"{where}: shape {tuple(value.shape)}, not {tuple(shape)}")
    try:
        array = value.detach().numpy().copy()
    except (TypeError, RuntimeError):
        raise Malformed(f"{where}: {value.dtype} is no NumPy dtype") from None
    # A server optimizer's state is finite (the strategy refuses a round that would make
    # it otherwise): a NaN here would freeze every later round.
    expect(bool(np.isfinite(array).all()), f"{where}: not finite")
    return array[()] if array.ndim == 0 else array


def _encode_named(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: _tensor(array) for name, array in arrays.items()}


def _decode_named(value: Any, frame: _Frame, where: str) -> dict[str, Any]:
    expect(by_name(value) and set(value) == set(frame.weights), f"{where}: not by array")
    return {k: _array(value[k], w.shape, f"{where}.{k}") for k, w in frame.weights.items()}


def _decode_second_moment(value: Any, frame: _Frame, where: str) -> dict[str, Any]:
    """FedOpt's v_t: a running mean of squares (or of their signed Yogi updates): >= 0."""
    moments = _decode_named(value, frame, where)
    for key, array in moments.items():
        expect(bool((np.asarray(array) >= 0).all()), f"{where}.{key}: negative")
    return moments


def _encode_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: _tensor(array.numpy()) for name, array in record.items()}


def _decode_record(value: Any, frame: _Frame, where: str) -> ArrayRecord:
    # FedAvgM pairs these with the aggregate's arrays by position: the model's order.
    ordered = by_name(value) and list(value) == list(frame.weights)
    expect(ordered, f"{where}: not the model's arrays in its order")
    arrays = {k: _array(value[k], w.shape, f"{where}.{k}") for k, w in frame.weights.items()}
    return ArrayRecord({k: Array(np.asarray(a)) for k, a in arrays.items()})


def _encode_list(arrays: list[Any]) -> list[torch.Tensor]:
    return [_tensor(array) for array in arrays]


def _decode_list(value: Any, frame: _Frame, where: str) -> list[Any]:
    shapes = [w.shape for w in frame.weights.values()]
    expect(isinstance(value, list) and len(value) == len(shapes), f"{where}: not one per array")
    return [
        _array(v, s, f"{where}[{i}]") for i, (v, s) in enumerate(zip(value, shapes, strict=True))
    ]


def _encode_accountants(accountants: dict[int, str]) -> dict[int, str]:
    return {int(partition): str(state) for partition, state in accountants.items()}


def _decode_accountants(value: Any, frame: _Frame, where: str) -> dict[int, str]:
    expect(isinstance(value, dict), f"{where}: not an accountant per client")
    for partition, state in value.items():
        expect(is_partition(partition, frame.num_clients), f"{where}: not by partition id")
        # The reply screen's own check: what the server kept is what a client could send.
        problem = accountant_state_problem(state)
        expect(problem is None, f"{where}[{partition}]: the accountant state {problem}")
    return dict(value)


def _decode_control(value: Any, frame: _Frame, where: str) -> ArrayRecord:
    """SCAFFOLD's c: one finite array per floating-point entry of the model."""
    floating = {k: w for k, w in frame.weights.items() if w.is_floating_point()}
    expect(by_name(value) and set(value) == set(floating), f"{where}: not by array")
    arrays = {k: _array(value[k], w.shape, f"{where}.{k}") for k, w in floating.items()}
    return ArrayRecord({k: Array(np.asarray(a)) for k, a in arrays.items()})


_FIELDS: dict[str, _Field] = {
    "accountants": _Field(FedAvg, _encode_accountants, _decode_accountants),
    "m_t": _Field(FedOpt, _encode_named, _decode_named),
    "v_t": _Field(FedOpt, _encode_named, _decode_second_moment),
    "current_arrays": _Field(FedAvgM, _encode_record, _decode_record),
    "momentum_vector": _Field(FedAvgM, _encode_list, _decode_list),
    # SCAFFOLD's (`LightningScaffold.control`; None, so not kept, for the other strategies).
    "control": _Field(FedAvg, _encode_record, _decode_control),
}


def _fields_of(cls: type) -> dict[str, _Field]:
    """The attributes a strategy of class `cls` keeps across rounds."""
    return {name: field for name, field in _FIELDS.items() if issubclass(cls, field.owner)}


def expect(condition: bool, what: str) -> None:
    """Raise Malformed(`what`) unless `condition` holds."""
    if not condition:
        raise Malformed(what)


def is_python_int(value: Any) -> bool:
    """A Python int, not a bool (resume.pt's plain data; `checks.is_int` is a reply's)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_partition(value: Any, clients: int) -> bool:
    """A partition id of a federation of `clients`."""
    return is_python_int(value) and 0 <= value < clients


def by_name(value: Any) -> bool:
    """A dict keyed by strings (array names)."""
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def is_tensor(value: Any) -> bool:
    """A plain dense CPU tensor (not sparse, quantized or a subclass)."""
    return (
        type(value) is torch.Tensor
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type == "cpu"
    )
