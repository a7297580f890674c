"""A round's train replies, each screened once: the reply screen, the DP-SGD plan, the norms.

Composes the screens every strategy applies to its updates, in this order, each rejection
counted and said once:
1. the reply screen (`fl_lightning.server.reply_screen`): records, identity, metrics, arrays;
2. under DP-SGD, the client's privacy plan (`PrivacyLedger.verified_rounds`): its epsilon
   and accountant must be what its plan gives for the rounds it was sent training;
3. the update screen (`fl_lightning.server.update_screen`): no update far larger than the round's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fl_lightning.config.schema import Config
from fl_lightning.models.state_dict import personal_keys
from fl_lightning.server.checks import partition_of
from fl_lightning.server.reply_screen import TRAIN, ReplyScreen
from fl_lightning.server.update_screen import norm_problems, update_norms
from fl_lightning.vocabulary import ACCOUNTANT_RECORD, EPSILON_METRIC, SCAFFOLD_RECORD

if TYPE_CHECKING:
    from fl_lightning.server.round_close import RoundRecorder


class RoundScreen:
    """Screens a round's train (and BatchNorm) replies, counting what it leaves out.

    Idempotent within a round: the client-level DP wrapper screens the raw replies before
    it clips them, then the strategy screens the screened list again; a reply seen before
    keeps its verdict and is not counted twice.
    """

    def __init__(self, cfg: Config, screen: ReplyScreen, recorder: RoundRecorder) -> None:
        self.cfg = cfg
        self.screen = screen
        self.recorder = recorder
        self.reference: ArrayRecord | None = None  # the round's global model
        self._sent = 0
        # This round's verdicts, by id() of the reply (held, so ids stay unique): the
        # partition of a usable reply, None for a refused one.
        self._round: int | None = None
        self._seen: dict[int, tuple[Message, int | None]] = {}
        self._taken: set[int] = set()
        # DP-SGD: each client's accountant (JSON) as last verified, kept for --resume.
        self.accountants: dict[int, str] = {}

    def start(self, reference: ArrayRecord, sent: int) -> None:
        """A round begins: its global model (less the personal layers, which clients do not
        send), and how many clients were sent training."""
        personal = set(personal_keys(reference.keys(), self.cfg.strategy.local_parameters))
        if personal:
            reference = ArrayRecord({k: a for k, a in reference.items() if k not in personal})
        self.reference, self._sent = reference, sent
        self._round, self._seen, self._taken = None, {}, set()

    def train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The round's usable train replies, in partition order."""
        replies = list(replies)
        if self._round != server_round:
            self._round, self._seen, self._taken = server_round, {}, set()
            self.recorder.lap("client_training")  # sending, training, receiving
            # Clients that never replied (round_timeout, dropped out) failed too.
            missing = max(0, self._sent - len(replies))
            self.recorder.count(failures=missing, rejected=0, skipped=0)
        new = [reply for reply in replies if id(reply) not in self._seen]
        screened = self.screen.screen(new, TRAIN, self.reference, taken=self._taken)
        self.recorder.count(failures=screened.failures, rejected=screened.rejected)
        planned = [reply for reply in screened.valid if self._within_plan(reply)]
        assert self.reference is not None  # the screen refuses arrays without a reference
        usable = {id(reply) for reply in self.norm_screened(planned, self.reference, TRAIN)}
        for reply in new:
            self._seen[id(reply)] = (reply, partition_of(reply) if id(reply) in usable else None)
        verdicts = [self._seen[id(reply)][1] for reply in replies]
        kept = [(p, reply) for p, reply in zip(verdicts, replies, strict=True) if p is not None]
        return [reply for _, reply in sorted(kept, key=lambda pair: pair[0])]

    def _within_plan(self, reply: Message) -> bool:
        """DP-SGD: the reply's epsilon and accountant are what its client's plan gives for
        the rounds it was sent training (then credited to the ledger); else rejected."""
        ledger = self.recorder.ledger
        if ledger is None or self.cfg.privacy.mode != "dp_sgd":
            return True
        partition = partition_of(reply)
        assert partition is not None  # the reply screen checked it
        state = reply.content.config_records[ACCOUNTANT_RECORD]["state"]
        epsilon = reply.content.metric_records["metrics"][EPSILON_METRIC]
        rounds = ledger.verified_rounds(partition, epsilon, str(state))
        if isinstance(rounds, str):
            self.reject(reply, TRAIN, rounds)
            return False
        # The client trained (its accountant says so) whether or not its update is used:
        # credited, and its accountant kept for --resume (`accountants`).
        ledger.record_trained(partition, rounds)
        self.accountants[partition] = str(state)
        return True

    def norm_screened(
        self, replies: list[Message], reference: ArrayRecord, stage: str
    ) -> list[Message]:
        """`replies` less those whose update is too large to be honest (`update_screen`).

        Under client-level DP only the absolute bound applies: a bound relative to the
        others would let one client's update decide whether another's is used.
        """
        s = self.cfg.strategy
        factor = None if self.cfg.privacy.mode == "client_dp" else s.update_norm_factor
        if factor is None and s.max_update_norm is None:
            return replies
        norms = update_norms([r.content.array_records["arrays"] for r in replies], reference)
        problems = norm_problems(norms, factor, s.max_update_norm)
        control = self.screen.control
        if control is not None and stage == TRAIN and factor is not None:
            # SCAFFOLD: a change of c_i far larger than the round's would move every
            # client's correction; the relative rule only (c_i's scale is not the weights').
            changes = [r.content.array_records[SCAFFOLD_RECORD] for r in replies]
            zero = ArrayRecord({k: Array(np.zeros_like(a.numpy())) for k, a in control.items()})
            too_large = norm_problems(update_norms(changes, zero), factor, None)
            problems = [
                p or (q and f"its control variate's change: {q}")
                for p, q in zip(problems, too_large, strict=True)
            ]
        for reply, problem in zip(replies, problems, strict=True):
            if problem is not None:
                self.reject(reply, stage, problem)
        return [reply for reply, problem in zip(replies, problems, strict=True) if not problem]

    def reject(self, reply: Message, stage: str, problem: str) -> None:
        """A reply the reply screen passed is left out after all: said, counted."""
        self.screen.reject(reply, stage, problem)
        self.recorder.count(rejected=1)
