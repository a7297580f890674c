"""What a killed run needs to continue: `checkpoints/resume.pt`, written after every round.

It holds the last completed round, the global weights, the strategy's own state (FedAdam's
moments, FedAvgM's momentum, DP-SGD clients' accountants), the privacy ledger, the
server's global RNG states (Flower's DP wrappers draw noise from NumPy's) and the round
records behind summary.md. Every client-side random draw (shuffles, dropout,
augmentation, DP-SGD noise) and client sampling is seeded by (seed, round, client).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fl_lightning.config import Config
from fl_lightning.errors import ConfigError
from fl_lightning.rundir import RunDir

# Attributes in which Flower's strategies keep state across rounds.
STRATEGY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector", "accountants")


@dataclass(frozen=True)
class ResumeState:
    """The state of a run after its last completed round."""

    round: int
    weights: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    history: dict[int, dict[str, float]]
    ledger: dict[str, Any] | None = None  # the server's privacy ledger
    # The server process's global RNGs (Flower's DP wrappers draw their noise from numpy's).
    rng: dict[str, Any] | None = None


def capture_rng() -> dict[str, Any]:
    """This process's global Python, NumPy and torch RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back what `capture_rng` saw."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def resume_path(run: RunDir) -> Path:
    """Where a run keeps its resume state."""
    return run.path / "checkpoints" / "resume.pt"


def strategy_state(strategy: object) -> dict[str, Any]:
    """The cross-round state of a Flower strategy (empty for FedAvg)."""
    return {
        name: getattr(strategy, name)
        for name in STRATEGY_STATE
        if getattr(strategy, name, None) is not None
    }


def save(run: RunDir, state: ResumeState) -> None:
    """Write the resume state atomically: a kill mid-write leaves the previous one intact."""
    path = resume_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {
            "round": state.round,
            "weights": state.weights,
            "strategy": state.strategy,
            "history": state.history,
            "ledger": state.ledger,
            "rng": state.rng,
        },
        partial,
    )
    partial.replace(path)


def load(cfg: Config, path: Path) -> tuple[RunDir, ResumeState]:
    """Check that `path` is a run of `cfg` that can continue, and load its state.

    Cuts metrics.jsonl back to the last completed round (a kill can leave a record of a
    round whose state was never saved).
    """
    run = RunDir(path)
    if not run.config.exists():
        raise ConfigError(f"--resume: {path} holds no run (no config.yaml); check the path")
    saved = yaml.safe_load(run.config.read_text())
    ours = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))  # as config.yaml holds it
    for section in (saved, ours):
        section.pop("output", None)  # where a run writes is not part of what it computes
    if saved != ours:
        key = _first_difference(saved, ours)
        raise ConfigError(
            f"--resume: {path} was run with another config ({key} differs); "
            "resume it with the config and overrides it was started with"
        )
    if not resume_path(run).exists():
        raise ConfigError(
            f"--resume: {path} has no completed round to continue from; start it again instead"
        )
    raw = torch.load(resume_path(run), map_location="cpu", weights_only=False)
    state = ResumeState(
        raw["round"], raw["weights"], raw["strategy"], raw["history"], raw["ledger"], raw["rng"]
    )
    if state.round >= cfg.federation.num_rounds:
        raise ConfigError(
            f"--resume: {path} already finished all {cfg.federation.num_rounds} rounds"
        )
    records = [(line, _round_of(line)) for line in run.metrics.read_text().splitlines()]
    kept = [line for line, r in records if r is not None and r <= state.round]
    run.metrics.write_text("".join(f"{line}\n" for line in kept))
    return run, state


def _round_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return None  # a record cut short by the kill


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "the config"
