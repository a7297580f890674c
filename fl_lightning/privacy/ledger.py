"""The server's privacy ledger: its own epsilon per client and round, and the budget gate.

Every epsilon the server logs or projects is its own computation, never a number a client
sent: it knows each DP-SGD client's plan (noise multiplier, sample rate, steps per round,
from the size the client gave the census) and how many rounds it sent that client
training. A client's reported epsilon and accountant are checked against them, and a
reply that disagrees is rejected.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from typing import Any

from opacus.accountants import create_accountant

from fl_lightning.config.schema import Config, sample_size
from fl_lightning.errors import PrivacyBudgetExceeded, show
from fl_lightning.privacy.dp_sgd import DPSGDPlan, plan


class PrivacyLedger:
    """Tracks the run's epsilon at `privacy.delta` and keeps every client within its budget.

    dp_sgd: each client's epsilon is its plan's epsilon after the rounds the server sent it
    training (`sampled`: an upper bound, whether or not its reply arrived). Before each
    round, a client whose next round would take it past `privacy.max_epsilon` is not sampled
    again; the run ends when too few clients are left (one client's plan, even a liar's,
    never stops the others).

    client_dp: one Gaussian release of the noised mean per round, with the noise
    multiplier over the clipping norm as its noise-to-sensitivity ratio, composed by
    Opacus's accountant (`privacy.accountant`) without sampling amplification (Flower
    samples a fixed number of clients, not a Poisson sample, so none is claimed); a round
    past the budget is not started.
    """

    def __init__(self, cfg: Config, partition_sizes: list[int]) -> None:
        self.cfg = cfg
        self.delta = cfg.privacy.delta
        self.max_epsilon = cfg.privacy.max_epsilon
        dp_sgd = cfg.privacy.mode == "dp_sgd"
        # One plan per distinct partition size: calibrating a noise multiplier is a search,
        # and with IID partitions thousands of clients share a handful of sizes.
        by_size = {size: plan(cfg, size) for size in set(partition_sizes)} if dp_sgd else {}
        self.plans: list[DPSGDPlan] = [by_size[size] for size in partition_sizes] if dp_sgd else []
        # dp_sgd: rounds each partition was sent training, and rounds its accepted replies'
        # accountants show (at most the first).
        self.sampled = [0] * len(partition_sizes)
        self.trained = [0] * len(partition_sizes)
        self._interrupted = False  # see `charge_interrupted_round`
        self.releases = create_accountant(cfg.privacy.accountant)
        # client_dp: noise std over clipping norm (calibrated once if target_epsilon is set).
        self.client_dp_noise_multiplier = (
            _client_dp_noise_multiplier(cfg) if cfg.privacy.mode == "client_dp" else 0.0
        )

    def client_epsilon(self, partition: int, rounds: int) -> float:
        """DP-SGD: the epsilon of `partition`'s plan after `rounds` rounds."""
        return _epsilon(self.plans[partition], rounds, self.delta)

    def projected_epsilon(self) -> float:
        """The largest epsilon one more round would bring a client."""
        if self.cfg.privacy.mode == "dp_sgd":
            return max((self._next(p) for p in range(len(self.plans))), default=0.0)
        accountant = create_accountant(self.cfg.privacy.accountant)
        accountant.history = [*self.releases.history]
        accountant.step(noise_multiplier=self.client_dp_noise_multiplier, sample_rate=1.0)
        return float(accountant.get_epsilon(self.delta))

    def _next(self, partition: int) -> float:
        """DP-SGD: `partition`'s epsilon were it sent training once more."""
        return self.client_epsilon(partition, self.sampled[partition] + 1)

    def within_budget(self, server_round: int, partitions: Iterable[int]) -> list[int]:
        """The `partitions` that may train in `server_round` without passing max_epsilon.

        Raises PrivacyBudgetExceeded when none may, or when the clients left out for their
        budget leave a round too few to aggregate (`federation.min_train_clients`): every
        later round would spend epsilon and then be skipped.
        """
        partitions = list(partitions)
        if self.max_epsilon is None:
            return partitions
        if self.cfg.privacy.mode == "dp_sgd":
            allowed = [p for p in partitions if self._next(p) <= self.max_epsilon]
            projected = min((self._next(p) for p in partitions), default=0.0)
        else:
            projected = self.projected_epsilon()
            allowed = partitions if projected <= self.max_epsilon else []
        f = self.cfg.federation
        sample, full = (sample_size(len(p), f.fraction_train) for p in (allowed, partitions))
        if not allowed or (
            len(allowed) < len(partitions) and sample < min(f.min_train_clients, full)
        ):
            raise PrivacyBudgetExceeded(
                f"round {server_round} not started: it would bring a client to epsilon "
                f"{projected:.3f} > privacy.max_epsilon={self.max_epsilon} (delta "
                f"{self.delta:g}); the model of round {server_round - 1} is the run's last"
            )
        return allowed

    def record_sampled(self, partitions: Iterable[int]) -> None:
        """dp_sgd: these partitions are sent training this round (they may spend a round)."""
        times = 2 if self._interrupted else 1
        self._interrupted = False
        for partition in partitions:
            self.sampled[partition] += times

    def charge_interrupted_round(self) -> None:
        """A resumed run with secret noise: the round the kill interrupted may already have
        trained (and released) once, and runs again with fresh noise, so it is charged
        twice: dp_sgd, to the clients its sampling (seeded, so the same) sends training;
        client_dp, one more release. (With reproducible noise the rerun repeats the very
        same computation and reveals nothing new.)"""
        if self.cfg.privacy.mode == "dp_sgd":
            self._interrupted = True
        else:
            self.record_release()

    def verified_rounds(self, partition: int, epsilon: object, state: str | None) -> int | str:
        """dp_sgd: the rounds a reply's accountant shows, if it matches the client's plan,
        or why the reply cannot be believed (`_verified_rounds`). `state` is the
        accountant's JSON, None where the client sends only its epsilon (SecAgg+)."""
        sent = (self.trained[partition], self.sampled[partition])
        return _verified_rounds(self.plans[partition], sent, epsilon, state, self.delta)

    def record_trained(self, partition: int, rounds: int) -> None:
        """dp_sgd: `partition`'s accepted reply showed `rounds` rounds of training."""
        self.trained[partition] = max(self.trained[partition], rounds)

    def record_release(self) -> None:
        """client_dp: one noised aggregate was released."""
        self.releases.step(noise_multiplier=self.client_dp_noise_multiplier, sample_rate=1.0)

    def state(self) -> dict[str, Any]:
        """What the ledger has recorded so far (for --resume)."""
        return {
            "sampled": list(self.sampled),
            "trained": list(self.trained),
            "releases": list(self.releases.history),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a killed run."""
        self.sampled = list(state["sampled"])
        self.trained = list(state["trained"])
        self.releases.history = list(state["releases"])

    def metrics(self) -> dict[str, float]:
        """`epsilon` (the largest client's) and, for dp_sgd, `epsilon_mean` over clients."""
        if self.cfg.privacy.mode == "dp_sgd":
            values = [
                self.client_epsilon(p, rounds) for p, rounds in enumerate(self.sampled) if rounds
            ]
            if not values:
                return {"epsilon": 0.0, "epsilon_mean": 0.0}
            return {"epsilon": max(values), "epsilon_mean": sum(values) / len(values)}
        if not self.releases.history:
            return {"epsilon": 0.0}
        return {"epsilon": float(self.releases.get_epsilon(self.delta))}


def _verified_rounds(
    client: DPSGDPlan, sent: tuple[int, int], epsilon: object, state: str | None, delta: float
) -> int | str:
    """The rounds of training a reply shows, or why it cannot be believed.

    `sent` is (rounds already credited, rounds the client was sent training): it can have
    trained at most in the latter, and at least once more than the former. `state` is in
    the form `accountant_state` checks.
    """
    trained, sampled = sent
    possible = range(trained + 1, sampled + 1)
    if state is not None:
        rounds = _rounds_in(client, json.loads(state)["history"])
        if isinstance(rounds, str):
            return f"its accountant {rounds} its plan's ({client})"
        if rounds not in possible:
            return (
                f"its accountant shows {rounds} rounds of training, not "
                f"{possible.start} to {possible.stop - 1}"
            )
        possible = range(rounds, rounds + 1)
    for rounds in possible:
        if _close(epsilon, _epsilon(client, rounds, delta)):
            return rounds
    return (
        f"it reports epsilon {show(epsilon)}; its plan gives "
        f"{_epsilon(client, sampled, delta):.6g} after the {sampled} rounds it was sent training"
    )


def _rounds_in(client: DPSGDPlan, history: list[list[Any]]) -> int | str:
    """The rounds of training an accountant's history holds, if every step is the plan's."""
    for sigma, rate, _ in history:
        if not (_close(sigma, client.noise_multiplier) and _close(rate, client.sample_rate)):
            return f"holds steps at noise multiplier {show(sigma)}, sample rate {show(rate)}: not"
    rounds, rest = divmod(sum(steps for *_, steps in history), client.steps_per_round)
    return "holds a part of a round, not" if rest else rounds


@functools.lru_cache(maxsize=4096)
def _epsilon(client: DPSGDPlan, rounds: int, delta: float) -> float:
    """A plan's epsilon after `rounds` rounds (an accountant's computation: tens of ms)."""
    return client.epsilon(rounds, delta)


def _close(value: object, expected: float) -> bool:
    """`value` is a finite number equal to `expected` up to float noise."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-12)
    )


def _client_dp_noise_multiplier(cfg: Config) -> float:
    """client_dp's noise multiplier: configured, or calibrated to target_epsilon over the run."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    assert p.target_epsilon is not None  # enforced by config validation
    return float(
        get_noise_multiplier(
            target_epsilon=p.target_epsilon,
            target_delta=p.delta,
            sample_rate=1.0,
            steps=cfg.federation.num_rounds,
            accountant=p.accountant,
        )
    )
