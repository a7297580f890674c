"""How every round ends, whatever runs it: centralized evaluation, checkpoints, one log record."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fl_lightning.config.schema import centrally_evaluated, keeps_client_state
from fl_lightning.errors import RoundCloseError
from fl_lightning.server import resume_state
from fl_lightning.server.evaluation import CentralEvaluator
from fl_lightning.server.round_metrics import RoundMetrics
from fl_lightning.server.round_watch import RoundWatch
from fl_lightning.server.rundir import RunDir
from fl_lightning.server.tracking import RunTracker

if TYPE_CHECKING:  # for annotations: opacus loads only for runs with differential privacy
    from fl_lightning.privacy.ledger import PrivacyLedger


# What --resume needs of a round besides the model: the strategy's `state_dict()` and its
# reply screen's agreed metric names (None: neither, as under SecAgg+).
Resumable = tuple[dict[str, Any], dict[str, Any] | None] | None


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

    @classmethod
    def taken(
        cls,
        recorder: RoundRecorder,
        server_round: int,
        state_dict: dict[str, torch.Tensor],
        resumable: Resumable,
        background: bool,
    ) -> _Closing:
        """The round's close as of now: what keeps changing while the next round runs is copied."""
        recorder.lap("between")  # anything since the last lap (the strategy's own bookkeeping)
        strategy, screened = resumable if resumable is not None else ({}, None)
        ledger = recorder.ledger
        return cls(
            server_round,
            {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
            dict(recorder.metrics),
            {source: dict(metrics) for source, metrics in recorder.sourced.items()},
            recorder.started,
            ledger.metrics() if ledger is not None else {},
            strategy,  # the strategy's state_dict() is already a copy
            ledger.state() if ledger is not None else None,
            resume_state.capture_rng(),
            screened,
            background,
        )


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


def _closer_thread() -> ThreadPoolExecutor:
    """The one thread that closes rounds in the background, at idle priority."""
    return ThreadPoolExecutor(
        1,
        thread_name_prefix="round-close",
        initializer=_idle_priority_thread,
        initargs=(torch.get_num_threads(),),
    )


class RoundRecorder(RoundMetrics):
    """Closes each round with its global model: evaluation, checkpoints, its log record.

    Shared by the Message-API strategies and SecAgg+, so both log the same record
    (`RoundMetrics`, plus `epsilon`, `seconds`, `time/centralized_evaluation`,
    `time/checkpoint`). A round closed with `close_in_background` is closed by one
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
        super().__init__()
        self.evaluator = evaluator
        self.tracker = tracker
        self.run = run
        self.ledger = ledger
        self._closer: ThreadPoolExecutor | None = None  # the background closes' one thread
        self._pending: list[Future[dict[str, float]]] = []
        self.watch = RoundWatch(evaluator.cfg)  # early stopping, best.ckpt

    def start(self) -> None:
        """A round (or round 0) begins: reset its metrics and clock; EarlyStopped if ended."""
        self.raise_failed_close()
        self.watch.raise_if_stopped()
        super().start()

    def lap(self, phase: str) -> None:
        """Record the seconds since the previous lap as `time/<phase>` (where rounds go)."""
        self.raise_failed_close()
        super().lap(phase)

    def close(
        self, server_round: int, state_dict: dict[str, torch.Tensor], resumable: Resumable = None
    ) -> dict[str, float]:
        """Evaluate the global model on the test split, checkpoint it, log the round record.

        `resumable` is the strategy's cross-round state and its reply screen's, as
        resume.pt keeps them. Returns the centralized metrics, once the rounds closing in
        the background and this one are written.
        """
        self.lap("between")
        self.wait()  # earlier rounds are written first
        # Their evaluations, still running when this round ended, hold it up: say so.
        self.lap("evaluation_backlog")
        closing = _Closing.taken(self, server_round, state_dict, resumable, background=False)
        return self._close(closing)

    def close_in_background(
        self, server_round: int, state_dict: dict[str, torch.Tensor], resumable: Resumable = None
    ) -> None:
        """`close`, but on the background thread, while the caller goes on to the next round
        (not with early stopping, which decides on this round before the next starts)."""
        if self.watch.stopping is not None:
            self.close(server_round, state_dict, resumable)
            return
        if keeps_client_state(self.evaluator.cfg):
            self.wait()  # one round at a time: clients' states need resume.pt close behind
        closing = _Closing.taken(self, server_round, state_dict, resumable, background=True)
        self._closer = self._closer or _closer_thread()
        self._pending.append(self._closer.submit(self._close, closing))

    def adoption_problem(self, state_dict: dict[str, torch.Tensor]) -> str | None:
        """Why a candidate global model must not be adopted: its server-side test on one
        batch gives metrics that are not finite (`CentralEvaluator.probe`)."""
        problem = self.evaluator.probe(state_dict)
        return None if problem is None else f"the new model is not adopted: {problem}"

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
        if centrally_evaluated(self.evaluator.cfg, closing.server_round):
            metrics = self.evaluator.evaluate(closing.state_dict)
        else:  # `evaluation.every_n_rounds`: no centralized point for this round
            self.evaluator.load(closing.state_dict)
            metrics = {}
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
        named = self.named({**closing.sourced, "centralized": metrics})
        self.tracker.log_round(closing.server_round, {**named, **record, **closing.privacy})
        if self.watch.active and closing.server_round >= 1:
            closing.step = "watching its metrics"
            self.watch.closed(self.run, self.tracker.history, closing.server_round)
        # Last: a round counts as completed for --resume once everything above is written.
        closing.step = "writing checkpoints/resume.pt"
        resume_state.save(
            self.run,
            resume_state.ResumeState(
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
