"""The privacy budget gate: which of the census's partitions a round may send training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fl_lightning.server.round_close import RoundRecorder


class BudgetGate:
    """Applied by every path (Message-API strategies and SecAgg+) before it samples a round.

    Without a ledger every bound partition may train. Under `privacy.max_epsilon`, a
    client whose next round would take it past the budget takes no further part (said
    once); `PrivacyLedger.within_budget` ends the run, before any client trains, when too
    few clients are left.
    """

    def __init__(self, recorder: RoundRecorder) -> None:
        self.recorder = recorder  # its ledger (None: no privacy) and its tracker
        self._said: set[int] = set()  # partitions already said to be past the budget

    def allowed(self, server_round: int, bound: Iterable[int]) -> list[int]:
        """The partitions of `bound` that may train in `server_round`, sorted."""
        bound, ledger = sorted(bound), self.recorder.ledger
        if ledger is None:
            return bound
        allowed = ledger.within_budget(server_round, bound)
        for partition in sorted(set(bound) - set(allowed) - self._said):
            self._said.add(partition)
            self.recorder.tracker.note(
                f"privacy budget: client {partition} takes no further part from round "
                f"{server_round}: another round would take it past privacy.max_epsilon="
                f"{ledger.max_epsilon}"
            )
        return allowed

    def record_sampled(self, partitions: Iterable[int]) -> None:
        """DP-SGD: these partitions are sent training this round (each may spend a round)."""
        ledger = self.recorder.ledger
        if ledger is not None and ledger.cfg.privacy.mode == "dp_sgd":
            ledger.record_sampled(partitions)
