"""Bounded checks of what clients send: numbers, their text, and the notices the server prints.

Everything here takes input a client chose (an error message of any length, a value of any
type) and does work bounded by constants, not by the input: text is cut before it is
parsed, and no pattern can backtrack.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.common.logger import log

from fl_lightning.vocabulary import IDENTITY_RECORD, MAX_METRIC_NAME, PARTITION_ID

if TYPE_CHECKING:
    from flwr.app import Message

# How much of a client's error text the server reads: its head and its tail (a traceback's
# exception line is near one or the other), each line at most MAX_LINE characters.
MAX_REASON_PART = 16 * 1024
MAX_LINE = 300
# "SomeError", "module.SomeException": what starts the line a traceback ends with.
_EXCEPTION_NAME = re.compile(r"[A-Za-z_][\w.]*")
_EXCEPTION_SUFFIXES = ("Error", "Exception", "Interrupt", "Exit", "Warning")
_WRAPPERS = ("ClientAppException", "RayTaskError")


def is_int(value: object) -> bool:
    """True for a Python or NumPy integer of int64's range, not a bool (Flower records allow
    both; a record that never went through protobuf, in a simulation, can hold any int)."""
    return (
        isinstance(value, int | np.integer)
        and not isinstance(value, bool | np.bool_)
        and bool(-(2**63) <= value < 2**63)
    )


def is_number(value: object) -> bool:
    """True for a finite int or float (not a bool, not a list)."""
    if is_int(value):
        return True  # exact, and float() of a huge int would overflow
    return isinstance(value, float | np.floating) and math.isfinite(value)


def is_metric_name(name: object, longest: int = MAX_METRIC_NAME) -> bool:
    """A metric name as a reply may carry it: a non-empty, printable string of at most
    `longest` characters."""
    return isinstance(name, str) and 0 < len(name) <= longest and name.isprintable()


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` cut to `limit` characters first, then made one printable line."""
    cut = text[: limit + 1]
    line = " ".join("".join(c if c.isprintable() else " " for c in cut).split())
    return line[:limit] + "..." if len(line) > limit or len(text) > limit else line


def error_summary(reason: object) -> str:
    """The client's own exception line from a failed reply's reason (Ray and Flower wrap it).

    Reads at most the first and last MAX_REASON_PART characters, each line at most
    MAX_LINE: a client that fails with megabytes of text costs the server no more than
    one that fails with a line.
    """
    text = reason if isinstance(reason, str) else str(reason or "")
    if len(text) > 2 * MAX_REASON_PART:
        text = text[:MAX_REASON_PART] + "\n" + text[-MAX_REASON_PART:]
    lines = [line.strip()[:MAX_LINE] for line in text.splitlines() if line.strip()]
    own = [line for line in lines if _is_exception_line(line)]
    if own:
        return own[-1]
    return lines[-1].removesuffix("'>") if lines else "no reason given"


def _is_exception_line(line: str) -> bool:
    """`SomeError: what happened`, not one of the wrappers Ray and Flower add."""
    name, sep, rest = line.partition(": ")
    if not sep or not rest or _EXCEPTION_NAME.fullmatch(name) is None:
        return False
    last = name.rsplit(".", 1)[-1]
    return last.endswith(_EXCEPTION_SUFFIXES) and not last.startswith(_WRAPPERS)


def partition_of(reply: Message) -> int | None:
    """The partition id a reply claims (None for a failed reply or one without a valid id)."""
    if reply.has_error():
        return None
    record = reply.content.config_records.get(IDENTITY_RECORD)
    value = None if record is None else record.get(PARTITION_ID)
    return int(value) if is_int(value) else None  # type: ignore[arg-type]


class Notices:
    """Says each distinct client problem once per run, and remembers who had which.

    Details hold text a client chose (key names, error messages): each is cut to one short
    printable line before anything else is done with it, and a client inventing new ones
    every round is said about only so often.
    """

    MAX_DETAIL = 300
    MAX_SAID = 100
    MAX_NAMED = 5  # clients named in `clients_line`

    def __init__(self) -> None:
        self._said: set[str] = set()
        self.first: str | None = None
        self.counts: Counter[str] = Counter()  # who -> problems counted
        self.reasons: dict[str, str] = {}  # who -> its first problem

    def say(self, what: str, detail: str, who: str | None = None) -> None:
        """Warn `what: detail` unless this detail was said before; count it against `who`."""
        detail = one_line(detail, self.MAX_DETAIL)
        line = f"{what}: {detail}"
        if self.first is None:
            self.first = line
        if who is not None:
            self.counts[who] += 1
            if who not in self.reasons and len(self.reasons) < self.MAX_SAID:
                self.reasons[who] = f"{what}: {detail}"
        if detail not in self._said and len(self._said) < self.MAX_SAID:
            self._said.add(detail)
            log(WARNING, "%s (repeats are counted, not shown)", line)

    def clients_line(self) -> str:
        """Which clients had problems, how often, and the first of each (a few, most first)."""
        named = [
            f"{who} ({self.counts[who]}x: {self.reasons[who]})"
            for who, _ in self.counts.most_common(self.MAX_NAMED)
            if who in self.reasons
        ]
        more = len(self.counts) - len(named)
        return "; ".join(named) + (f"; and {more} more" if more > 0 else "")
