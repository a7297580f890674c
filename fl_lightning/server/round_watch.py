"""Watching a round metric: `federation.early_stopping` and `output.best_checkpoint`.

Both follow one metric of the round records (as metrics.jsonl names it) from round 1 on:
the best checkpoint is the global model of the round with the best value so far; early
stopping ends the run after `patience` rounds with a value that did not improve on the
best, as Lightning's `EarlyStopping` counts its checks. A record without the value (a
round the server did not test, `evaluation.every_n_rounds`) changes neither; a value that
is not finite counts as no improvement. Their
state is recomputed from the run's history on --resume, so a resumed run decides as the
uninterrupted one would.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path

from fl_lightning.config.schema import Config
from fl_lightning.errors import EarlyStopped, RoundCloseError
from fl_lightning.files import write_atomically
from fl_lightning.server.rundir import RunDir
from fl_lightning.server.tracking import shown


class BestValue:
    """The best value of one metric over the rounds so far, and its round."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0) -> None:
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.value: float | None = None
        self.round: int | None = None
        self.stale = 0  # rounds with a value since the best one, none better

    def update(self, server_round: int, record: Mapping[str, float]) -> bool:
        """Take the round's value; True when it is the new best."""
        value = record.get(self.monitor)
        if value is None:
            return False
        if not math.isfinite(value):
            self.stale += self.round is not None
            return False
        if self.value is not None:
            gain = self.value - value if self.mode == "min" else value - self.value
            if gain <= self.min_delta:
                self.stale += 1
                return False
        self.value, self.round, self.stale = value, server_round, 0
        return True


class RoundWatch:
    """What the run's round records decide: which round is best, and whether to stop."""

    def __init__(self, cfg: Config) -> None:
        e, b = cfg.federation.early_stopping, cfg.output.best_checkpoint
        self.patience = e.patience
        self.stopping = BestValue(e.monitor, e.mode, e.min_delta) if e.monitor else None
        self.best = BestValue(b.monitor, b.mode) if b.monitor else None
        self.stop_reason: str | None = None
        self._names_checked = False

    @property
    def active(self) -> bool:
        """Whether any metric is watched."""
        return self.stopping is not None or self.best is not None

    def check_names(self, history: Mapping[int, Mapping[str, float]]) -> None:
        """After the first round that trained: a watched name no record up to it has is an
        error, with the names that exist."""
        names = {name for record in history.values() for name in record}
        for key, watched in (
            ("federation.early_stopping.monitor", self.stopping),
            ("output.best_checkpoint.monitor", self.best),
        ):
            if watched is not None and watched.monitor not in names:
                shown = ", ".join(sorted(n for n in names if not n.startswith("time/")))
                raise RoundCloseError(
                    f"{key}: {watched.monitor!r} is not a round metric; the rounds log "
                    f"{shown}; name one of them"
                )

    def update(self, server_round: int, record: Mapping[str, float]) -> bool:
        """Take a closed round's record (rounds >= 1); True when it is the new best round."""
        best = self.best.update(server_round, record) if self.best is not None else False
        s = self.stopping
        if s is not None:
            s.update(server_round, record)
            if s.round is not None and s.stale >= self.patience:
                self.stop_reason = (
                    f"early stopping: {s.monitor} has not improved by more than "
                    f"{s.min_delta:g} in {self.patience} rounds that measured it after "
                    f"round {s.round} ({s.monitor} {s.value:.4f})"
                )
        return best

    def closed(
        self, run: RunDir, history: Mapping[int, Mapping[str, float]], server_round: int
    ) -> None:
        """A round (>= 1) is logged: check the names after round 1, keep best.ckpt."""
        if not self._names_checked and _trained(history, server_round):
            self.check_names(history)
            self._names_checked = True
        if self.update(server_round, history[server_round]):
            self._keep_best(run, server_round)

    @staticmethod
    def _keep_best(run: RunDir, server_round: int) -> None:
        """checkpoints/best.ckpt: a copy of the round's checkpoint."""
        source = run.checkpoint(f"round_{server_round}")
        if not source.exists():  # removed by hand: best.ckpt stays as it is
            return

        def copy(partial: Path) -> None:
            shutil.copyfile(source, partial)

        write_atomically(run.checkpoint("best"), copy)

    def replay(self, history: Mapping[int, Mapping[str, float]], run: RunDir) -> None:
        """--resume: the best rounds and the stop, as the killed run had them; best.ckpt
        again from the best round (the killed run may have copied a later one)."""
        for server_round in sorted(r for r in history if r >= 1):
            self.update(server_round, history[server_round])
        if self.best is not None and self.best.round is not None:
            self._keep_best(run, self.best.round)

    def raise_if_stopped(self) -> None:
        """EarlyStopped, once early stopping has ended the run."""
        if self.stop_reason is not None:
            raise EarlyStopped(self.stop_reason)


def _trained(history: Mapping[int, Mapping[str, float]], server_round: int) -> bool:
    """Whether the round logged a module metric the server's test of round 0 did not: its
    clients trained (a round whose every client failed logs no name to check against)."""
    initial = history.get(0, {})
    return any(shown(k) and k not in initial for k in history[server_round])
