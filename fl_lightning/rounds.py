"""How every round ends, whatever runs it: centralized evaluation, checkpoints, one log record."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from logging import WARNING
from typing import TYPE_CHECKING, Any

import torch
from flwr.common.logger import log

from fl_lightning import resume
from fl_lightning.config import OptimizerConfig
from fl_lightning.errors import RoundCloseError
from fl_lightning.evaluation import CentralEvaluator
from fl_lightning.rundir import RunDir
from fl_lightning.strategy_state import strategy_state
from fl_lightning.tracking import RunTracker

if TYPE_CHECKING:  # for annotations: opacus loads only for runs with differential privacy
    from fl_lightning.privacy_ledger import PrivacyLedger
    from fl_lightning.replies import ReplyScreen


def round_lr_factor(o: OptimizerConfig, server_round: int) -> float:
    """What the module's learning rates are multiplied by in `server_round` (1-based):
    linear warmup over `warmup_rounds`, then `round_decay` per round."""
    warmup = min(1.0, server_round / o.warmup_rounds) if o.warmup_rounds else 1.0
    return warmup * o.round_decay ** (server_round - 1)


# Where a round's module metrics come from, in the order a shared name is settled: the
# server's test metrics keep their names; a training or validation metric logged under a
# name a source before it has used is kept apart as `<source>/<name>`.
SOURCES = ("centralized", "train", "distributed")
# The order the sources appear in a round's record (and on its console line).
RECORD_ORDER = ("train", "distributed", "centralized")


@dataclass
class _Closing:
    """What a round's close needs, taken when the round hands its global model over."""

    server_round: int
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    sourced: dict[str, dict[str, float]]
    started: float
    privacy: dict[str, float]
    strategy: dict[str, Any]
    ledger: dict[str, Any] | None
    rng: dict[str, Any]
    screened: dict[str, Any] | None
    background: bool
    handed_over: float = field(default_factory=time.perf_counter)
    step: str = "handing the round over"  # what the close is doing, for its error message


def _idle_priority_thread(threads: int) -> None:
    """Make the calling thread, and the torch threads it starts, run on idle cores only."""
    # SCHED_IDLE (Linux; per thread, inherited by the OpenMP threads this one starts): the
    # evaluation fills cores the clients leave idle, such as a round's last wave of
    # clients, never slows a client down, and runs at full speed when nothing else does.
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    # A new thread's torch thread count is OpenMP's default, not the server's: use the
    # server's, so a round's numbers do not depend on which thread evaluated it.
    torch.set_num_threads(threads)


class RoundRecorder:
    """Collects a round's client metrics and closes the round with the global model.

    Shared by the Message-API strategies and the SecAgg+ (legacy API) path, so both log
    the same record: the module's train, distributed (clients' validation) and centralized
    (server's test) metrics under the names it logs them, `epsilon`, `seconds`,
    and where the round's seconds went (`time/client_training`, `time/aggregation`,
    `time/client_evaluation`, `time/centralized_evaluation`, `time/checkpoint`, and for a
    round closed with `close`, `time/evaluation_backlog`: the wait for earlier rounds').

    A round closed with `close_in_background` is evaluated, checkpointed and logged by one
    idle-priority thread while the next round trains; rounds are still written one at a
    time, in order, and `wait` returns once all of them are.
    """

    def __init__(
        self,
        evaluator: CentralEvaluator,
        tracker: RunTracker,
        run: RunDir,
        ledger: PrivacyLedger | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.tracker = tracker
        self.run = run
        self.ledger = ledger
        self.strategy: object | None = None  # whose cross-round state --resume restores
        self.screen: ReplyScreen | None = None  # whose metric names --resume restores
        self.metrics: dict[str, float] = {}
        # The module's metrics of the round, by source (train, distributed), as logged.
        self.sourced: dict[str, dict[str, float]] = {}
        # Every module metric name each source has logged in the run (see `_named`).
        self._seen: dict[str, set[str]] = {source: set() for source in SOURCES}
        self._started = self._lap = time.perf_counter()
        self._closer: ThreadPoolExecutor | None = None  # the background closes' one thread
        self._pending: list[Future[dict[str, float]]] = []

    def start(self) -> None:
        """A round (or the initial evaluation) begins: reset its metrics and clock."""
        self.raise_failed_close()
        self.metrics = {}
        self.sourced = {}
        self._started = self._lap = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Record the seconds since the previous lap as `time/<phase>` (where rounds go)."""
        self.raise_failed_close()
        now = time.perf_counter()
        self.metrics[f"time/{phase}"] = self.metrics.get(f"time/{phase}", 0.0) + now - self._lap
        self._lap = now

    def count(self, **counts: int) -> None:
        """Add to this round's counters (`failures`, `rejected`), logged even when zero."""
        for name, n in counts.items():
            self.metrics[name] = self.metrics.get(name, 0) + n

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

    def close(self, server_round: int, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Evaluate the global model on the test split, checkpoint it, log the round record.

        Returns the centralized metrics, once the rounds closing in the background and
        this one are written.
        """
        self.lap("between")
        self.wait()  # earlier rounds are written first
        # Their evaluations, still running when this round ended, hold it up: say so, rather
        # than leave it in time/between (the scale setup's short rounds pile them up).
        self.lap("evaluation_backlog")
        return self._close(self._hand_over(server_round, state_dict, background=False))

    def close_in_background(self, server_round: int, state_dict: dict[str, torch.Tensor]) -> None:
        """`close`, but on the background thread, while the caller goes on to the next round."""
        closing = self._hand_over(server_round, state_dict, background=True)
        if self._closer is None:
            self._closer = ThreadPoolExecutor(
                1,
                thread_name_prefix="round-close",
                initializer=_idle_priority_thread,
                initargs=(torch.get_num_threads(),),
            )
        self._pending.append(self._closer.submit(self._close, closing))

    def _hand_over(
        self, server_round: int, state_dict: dict[str, torch.Tensor], background: bool
    ) -> _Closing:
        """The round's close as of now: what keeps changing while the next round runs is copied."""
        self.lap("between")  # anything since the last lap (the strategy's own bookkeeping)
        strategy = strategy_state(self.strategy) if self.strategy is not None else {}
        return _Closing(
            server_round,
            {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
            dict(self.metrics),
            {source: dict(metrics) for source, metrics in self.sourced.items()},
            self._started,
            self.ledger.metrics() if self.ledger is not None else {},
            strategy,  # strategy_state already copies
            self.ledger.state() if self.ledger is not None else None,
            resume.capture_rng(),
            self.screen.state() if self.screen is not None else None,
            background,
        )

    def adoption_problem(self, state_dict: dict[str, torch.Tensor]) -> str | None:
        """Why a candidate global model must not be adopted (`CentralEvaluator.probe`)."""
        return self.evaluator.probe(state_dict)

    def skip(self, why: str, server_round: int) -> None:
        """The round's aggregate is not adopted: said, counted as `skipped`."""
        log(WARNING, "round %d skipped: %s; the global model stays as it was", server_round, why)
        self.count(skipped=1)
        self.lap("aggregation")

    def wait(self) -> None:
        """Block until every round closing in the background is written; raise its error."""
        while self._pending:
            self._pending.pop(0).result()

    def raise_failed_close(self) -> None:
        """Raise the `RoundCloseError` of a background close that has failed, if any, now.

        Called at every step of the next rounds (`start`, `lap`): a full disk stops the run
        within the round in which the write failed, not after all the rounds.
        """
        # One thread closes the rounds in order: only the oldest can have finished.
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def _close(self, closing: _Closing) -> dict[str, float]:
        """`_finish`, its error said in one line naming the round and the step that failed."""
        try:
            return self._finish(closing)
        except Exception as err:
            reason = " ".join(str(err).split())  # e.g. load_state_dict's multi-line message
            raise RoundCloseError(
                f"round {closing.server_round} could not be closed: {closing.step} failed "
                f"({type(err).__name__}: {reason}); the rounds before it are in {self.run.path}"
            ) from err

    def logged_names(self) -> dict[str, list[str]]:
        """Every module metric name each source has logged in the run (for --resume)."""
        return {source: sorted(names) for source, names in self._seen.items()}

    def load_logged_names(self, logged: dict[str, list[str]]) -> None:
        """Continue from `logged_names()` of a killed run: a resumed run names as it did."""
        self._seen = {source: set(logged.get(source, ())) for source in SOURCES}

    def _named(self, sourced: dict[str, dict[str, float]]) -> dict[str, float]:
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

    def shutdown(self) -> None:
        """Wait for the background closes, then stop their thread."""
        try:
            self.wait()
        finally:
            if self._closer is not None:
                self._closer.shutdown()
                self._closer = None

    def _finish(self, closing: _Closing) -> dict[str, float]:
        record = closing.metrics
        started = time.perf_counter()
        closing.step = "the centralized evaluation"
        metrics = self.evaluator.evaluate(closing.state_dict)
        evaluated = time.perf_counter()
        closing.step = "writing its checkpoints"
        self.evaluator.save_checkpoint(self.run.checkpoint(f"round_{closing.server_round}"))
        self.evaluator.save_checkpoint(self.run.checkpoint("last"))
        checkpointed = time.perf_counter()
        record["time/centralized_evaluation"] = evaluated - started
        record["time/checkpoint"] = checkpointed - evaluated
        # The round's own wall time: up to the hand-over when closed in the background (the
        # rest overlaps the next round), else up to now.
        ended = closing.handed_over if closing.background else checkpointed
        record["seconds"] = ended - closing.started
        closing.step = "logging its metrics"
        named = self._named({**closing.sourced, "centralized": metrics})
        self.tracker.log_round(closing.server_round, {**named, **record, **closing.privacy})
        # Last: a round counts as completed for --resume once everything above is written.
        closing.step = "writing checkpoints/resume.pt"
        resume.save(
            self.run,
            resume.ResumeState(
                closing.server_round,
                closing.state_dict,
                closing.strategy,
                self.tracker.history,
                closing.ledger,
                closing.rng,
                self.logged_names(),  # this round's names included: rounds are named in order
                closing.screened,
            ),
        )
        return metrics
