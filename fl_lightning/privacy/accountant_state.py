"""What a DP-SGD client's accountant state must be, wherever the server meets one.

A DP-SGD client sends its Opacus accountant (RDP or PRV) with every train reply, as the JSON
of its `state_dict()` (`fl_lightning.privacy.dp_sgd.ClientDPSGD.state`); the server keeps it
in resume.pt and, after `--resume`, sends it back to the client, which loads it. The reply
screen and the resume check both use `accountant_state_problem`, so a state the server
accepts from a client is exactly one that a resumed run accepts from resume.pt and that
Opacus can load. Deliberately light (no torch, no Opacus): the reply screen imports it.
"""

from __future__ import annotations

import json
import math
from typing import Any

# A DP-SGD accountant's JSON grows by a few dozen bytes a round; this bounds what the server
# keeps and resends after --resume.
MAX_ACCOUNTANT_CHARS = 1_000_000
# The keys of an Opacus accountant's `state_dict()` (opacus 1.6), and the mechanisms whose
# history (noise multiplier, sample rate, steps) a client may keep (`privacy.accountant`).
_KEYS = {"history", "mechanism"}
_MECHANISMS = ("rdp", "prv")


def accountant_state_problem(text: object) -> str | None:
    """Why `text` is not an accountant's state as a DP-SGD client sends it; None if it is.

    That is a JSON object `{"history": [[noise multiplier, sample rate, steps], ...],
    "mechanism": "rdp" or "prv"}` of at most `MAX_ACCOUNTANT_CHARS` characters, each step a finite
    noise multiplier >= 0, a sample rate in [0, 1] and an integer count >= 1.
    """
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not JSON text"
    if len(text) > MAX_ACCOUNTANT_CHARS:
        return f"is over {MAX_ACCOUNTANT_CHARS} characters"
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):  # ValueError: also an int of too many digits
        return "is not JSON"
    if not isinstance(state, dict) or set(state) != _KEYS:
        return f"is not a JSON object with exactly the keys {sorted(_KEYS)}"
    if state["mechanism"] not in _MECHANISMS:
        return f"is not an RDP or PRV accountant's (mechanism {str(state['mechanism'])[:40]!r})"
    history = state["history"]
    if not isinstance(history, list):
        return "has a history that is not a list"
    for index, step in enumerate(history):
        if not is_rdp_step(step):
            return (
                f"has history[{index}] that is not [noise multiplier >= 0, "
                "sample rate in [0, 1], steps >= 1]"
            )
    return None


def is_rdp_step(entry: Any) -> bool:
    """An accountant's history entry: (noise multiplier, sample rate, steps), in range."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        return False
    noise, rate, steps = entry
    return (
        _is_finite(noise)
        and noise >= 0
        and _is_finite(rate)
        and 0 <= rate <= 1
        and isinstance(steps, int)
        and not isinstance(steps, bool)
        and steps >= 1
    )


def _is_finite(value: Any) -> bool:
    """A finite int or float, not a bool (JSON's `true` is no number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)
