"""`checkpoints/resume.pt`, written after every round: what a killed run needs to continue.

It holds the last completed round, the global weights, the strategy's own state (FedAdam's
moments, FedAvgM's momentum, DP-SGD clients' accountants), the privacy ledger, the
server's global RNG states (Flower's DP wrappers draw noise from NumPy's), the round
records behind summary.md, and the module's metric names the run has settled so far: a
resumed run names and screens metrics as the run it continues. Only tensors and plain data
are written, so that `torch.load(weights_only=True)` reads it back (`server.resume`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_lightning.files import write_atomically
from fl_lightning.server.rundir import RunDir
from fl_lightning.server.strategy_state import Malformed, expect, is_python_int, is_tensor

# resume.pt's layout. Format 3 kept the clients' reported epsilons, format 2 lacked the
# metric names, format 1 was a pickle of Python objects: all refused now.
FORMAT = 4
_RNG_KEYS = {"python", "numpy", "torch"}
_NUMPY_RNG_KEYS = {"key", "pos", "has_gauss", "cached_gaussian"}
_MT19937_WORDS = 624  # NumPy's legacy global RNG (MT19937) keeps 624 32-bit words


@dataclass(frozen=True)
class ResumeState:
    """The state of a run after its last completed round, as resume.pt holds it."""

    round: int
    weights: dict[str, torch.Tensor]
    strategy: dict[str, Any]  # `strategy_state.strategy_state`: tensors and plain data
    history: dict[int, dict[str, float]]
    ledger: dict[str, Any] | None = None  # the server's privacy ledger
    # The server process's global RNGs (`capture_rng`; Flower's DP wrappers draw from NumPy's).
    rng: dict[str, Any] | None = None
    # The module's metric names each source has logged (`RoundRecorder.logged_names`).
    logged: dict[str, list[str]] = field(default_factory=dict)
    # The replies' agreed and voted-for metric names (`ReplyScreen.state`; None: no screen).
    screened: dict[str, Any] | None = None


def resume_path(run: RunDir) -> Path:
    """Where a run keeps its resume state."""
    return run.path / "checkpoints" / "resume.pt"


def save(run: RunDir, state: ResumeState) -> None:
    """Write the resume state atomically: a kill mid-write leaves the previous one intact."""
    path = resume_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _plain(
        {
            "format": FORMAT,
            "round": state.round,
            "weights": state.weights,
            "strategy": state.strategy,
            "history": state.history,
            "ledger": state.ledger,
            "rng": state.rng,
            "logged": state.logged,
            "screened": state.screened,
        }
    )
    write_atomically(path, lambda partial: torch.save(payload, partial))


def _plain(value: Any) -> Any:
    """`value` as what weights_only loading builds: NumPy scalars become Python numbers."""
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"resume state holds a {type(value).__name__}: only tensors and plain data")


def capture_rng() -> dict[str, Any]:
    """This process's global Python, NumPy and torch RNG states, as tensors and plain data."""
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple), "NumPy's global RNG is the legacy MT19937"
    _, key, pos, has_gauss, cached_gaussian = state
    return {
        "python": random.getstate(),  # (version, tuple of ints, None or float)
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back what `capture_rng` saw."""
    python, numpy, generator = decode_rng(rng)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(generator)


def decode_rng(rng: Any) -> tuple[Any, Any, torch.Tensor]:
    """`capture_rng`'s states as Python, NumPy and torch take them; each tried on a fresh RNG."""
    expect(isinstance(rng, dict) and set(rng) == _RNG_KEYS, "rng: not the server's RNG states")
    python = rng["python"]
    what = "rng.python: not a Python RNG state"
    # (version, 625 words, None or a cached gauss), as random.getstate() gives it.
    expect(isinstance(python, tuple) and len(python) == 3 and is_python_int(python[0]), what)
    words, gauss = python[1], python[2]
    expect(isinstance(words, tuple) and all(is_python_int(w) and w >= 0 for w in words), what)
    expect(gauss is None or isinstance(gauss, float), what)
    try:
        random.Random().setstate(python)
    except (TypeError, ValueError, OverflowError):
        raise Malformed(what) from None
    numpy = _decode_numpy_rng(rng["numpy"])
    generator = rng["torch"]
    try:
        expect(is_tensor(generator), "")
        torch.Generator().set_state(generator)
    except (Malformed, RuntimeError, TypeError):
        raise Malformed("rng.torch: not a torch RNG state") from None
    return python, numpy, generator


def _decode_numpy_rng(state: Any) -> tuple[str, np.ndarray, int, int, float]:
    """NumPy's legacy MT19937 state tuple, from `capture_rng`'s dict."""
    what = "rng.numpy: not a NumPy RNG state"
    expect(isinstance(state, dict) and set(state) == _NUMPY_RNG_KEYS, what)
    key = state["key"]
    expect(is_tensor(key) and key.dtype == torch.int64 and key.shape == (_MT19937_WORDS,), what)
    words = key.numpy()
    expect(bool((words >= 0).all() and (words < 2**32).all()), what)
    pos, has_gauss, cached = state["pos"], state["has_gauss"], state["cached_gaussian"]
    expect(is_python_int(pos) and 0 <= pos <= _MT19937_WORDS, what)
    expect(is_python_int(has_gauss) and has_gauss in (0, 1) and isinstance(cached, float), what)
    decoded = ("MT19937", words.astype(np.uint32), pos, has_gauss, cached)
    try:
        np.random.RandomState().set_state(decoded)
    except (TypeError, ValueError):
        raise Malformed(what) from None
    return decoded
