"""Client replies before aggregation: failures counted, bad updates rejected, a fixed order.

A failed client (it raised, timed out or dropped out) and a reply whose arrays could not
come from the global model (other keys, shapes or dtypes, NaN or Inf) are left out of the
round and counted; nothing of theirs is averaged in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log


@dataclass(frozen=True)
class Screened:
    """The replies a round aggregates, in partition order, and what was left out."""

    valid: list[Message]
    failures: int
    rejected: int


def update_problem(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why `arrays` cannot be aggregated into the global model `reference`; None if it can."""
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        unexpected = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"its arrays do not match the model's (missing {missing}, unexpected {unexpected})"
    for key, expected in reference.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(expected.shape):
            return f"{key} has shape {tuple(array.shape)}, the model's is {tuple(expected.shape)}"
        if array.dtype != expected.dtype:
            return f"{key} has dtype {array.dtype}, the model's is {expected.dtype}"
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{key} contains {int((~np.isfinite(values)).sum())} NaN/Inf values"
    return None


# "SomeError: what happened", the line a traceback ends with.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b.*: .+")


def error_summary(reason: str | None) -> str:
    """The client's own exception line from a failed reply's reason (Ray and Flower wrap it)."""
    lines = [line.strip() for line in (reason or "").splitlines() if line.strip()]
    own = [
        line
        for line in lines
        if _EXCEPTION_LINE.match(line)
        and "ClientAppException" not in line
        and "RayTaskError" not in line
    ]
    if own:
        return own[-1]
    return lines[-1].removesuffix("'>") if lines else "no reason given"


def partition_of(reply: Message) -> int:
    """The partition id a reply carries (-1 for a failed or anonymous reply)."""
    if reply.has_error() or "client" not in reply.content.config_records:
        return -1
    return int(reply.content.config_records["client"]["partition-id"])  # type: ignore[arg-type]


class ReplyScreen:
    """Screens each round's replies; says each distinct client error once per run."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def _warn_once(self, what: str, detail: str) -> None:
        if detail not in self._said:
            self._said.add(detail)
            log(WARNING, "%s: %s (repeats are counted, not shown)", what, detail)

    def screen(
        self, replies: list[Message], stage: str, reference: ArrayRecord | None = None
    ) -> Screened:
        """Drop failed replies and, given the global model `reference`, bad updates."""
        valid: list[Message] = []
        failures = rejected = 0
        for reply in replies:
            if reply.has_error():
                failures += 1
                self._warn_once(f"a client failed in {stage}", error_summary(reply.error.reason))
                continue
            if reference is not None:
                problem = _arrays_problem(reply, reference)
                if problem is not None:
                    rejected += 1
                    self._warn_once(f"update of client {partition_of(reply)} rejected", problem)
                    continue
            valid.append(reply)
        # Sorted by partition: float sums then do not depend on arrival order.
        return Screened(sorted(valid, key=partition_of), failures, rejected)


def _arrays_problem(reply: Message, reference: ArrayRecord) -> str | None:
    records = reply.content.array_records
    if len(records) != 1:
        return f"it carries {len(records)} array records, not 1"
    (arrays,) = records.values()
    return update_problem(arrays, reference)
