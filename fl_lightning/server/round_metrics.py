"""What a round measured, and under which names the run logs it.

A round's record holds the module's train, distributed (clients' validation) and
centralized (server's test) metrics under the names the module logs them, the round's
counters (`failures`, `rejected`, `skipped`), where its seconds went (`time/<phase>`),
and without privacy each client's own metrics (`clients/...`).
"""

from __future__ import annotations

import statistics
import time
from logging import WARNING

from flwr.common.logger import log

# Where a round's module metrics come from, in the order a shared name is settled: the
# server's test metrics keep their names; a training or validation metric logged under a
# name a source before it has used is kept apart as `<source>/<name>`.
SOURCES = ("centralized", "train", "distributed")
# The order the sources appear in a round's record (and on its console line).
RECORD_ORDER = ("train", "distributed", "centralized")


class RoundMetrics:
    """Collects one round's metrics at a time; names each round's module metrics in order."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        # The module's metrics of the round, by source (train, distributed), as logged.
        self.sourced: dict[str, dict[str, float]] = {}
        # Every module metric name each source has logged in the run (see `named`).
        self._seen: dict[str, set[str]] = {source: set() for source in SOURCES}
        self.started = self._lap = time.perf_counter()

    def start(self) -> None:
        """A round (or the initial evaluation) begins: reset its metrics and clock."""
        self.metrics = {}
        self.sourced = {}
        self.started = self._lap = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Record the seconds since the previous lap as `time/<phase>` (where rounds go)."""
        now = time.perf_counter()
        self.metrics[f"time/{phase}"] = self.metrics.get(f"time/{phase}", 0.0) + now - self._lap
        self._lap = now

    def count(self, **counts: int) -> None:
        """Add to this round's counters (`failures`, `rejected`), logged even when zero."""
        for name, n in counts.items():
            self.metrics[name] = self.metrics.get(name, 0) + n

    def skip(self, why: str, server_round: int) -> None:
        """The round's aggregate is not adopted: said, counted as `skipped`."""
        log(WARNING, "round %d skipped: %s; the global model stays as it was", server_round, why)
        self.count(skipped=1)
        self.lap("aggregation")

    def add(self, metrics: dict[str, float], source: str = "") -> None:
        """Metrics of this round: the module's, from `source` (train, distributed), or ours."""
        if source:
            self.sourced.setdefault(source, {}).update(metrics)
        else:
            self.metrics.update(metrics)

    def add_clients(self, metrics: dict[int, dict[str, float]]) -> None:
        """Each client's own metrics this round, by partition, and their spread across clients.

        Logged as `clients/<partition>/<name>` and `clients/min|median|mean|max/<name>` (the
        mean unweighted: which clients lag shows here, not in the weighted mean).
        """
        for partition, own in sorted(metrics.items()):
            for name, value in own.items():
                self.metrics[f"clients/{partition}/{name}"] = value
        names = sorted({name for own in metrics.values() for name in own})
        for name in names:
            values = [own[name] for own in metrics.values() if name in own]
            spread: dict[str, float] = {
                "min": min(values),
                "median": statistics.median(values),
                "mean": sum(values) / len(values),
                "max": max(values),
            }
            for statistic, value in spread.items():
                self.metrics[f"clients/{statistic}/{name}"] = value

    def logged_names(self) -> dict[str, list[str]]:
        """Every module metric name each source has logged in the run (for --resume)."""
        return {source: sorted(names) for source, names in self._seen.items()}

    def load_logged_names(self, logged: dict[str, list[str]]) -> None:
        """Continue from `logged_names()` of a killed run: a resumed run names as it did."""
        self._seen = {source: set(logged.get(source, ())) for source in SOURCES}

    def named(self, sourced: dict[str, dict[str, float]]) -> dict[str, float]:
        """The round's module metrics under the names the run logs them (in `RECORD_ORDER`).

        Rounds are named one at a time, in order, so a name's fate is settled the first
        time it appears: from the initial evaluation on for the test metrics, from the
        first round on for the others.
        """
        names: dict[str, dict[str, float]] = {}
        for index, source in enumerate(SOURCES):
            before = set().union(*(self._seen[s] for s in SOURCES[:index]))
            own = sourced.get(source, {})
            self._seen[source].update(own)
            names[source] = {
                (f"{source}/{name}" if name in before else name): value
                for name, value in own.items()
            }
        return {k: v for source in RECORD_ORDER for k, v in names[source].items()}
