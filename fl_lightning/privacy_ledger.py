"""The server's privacy ledger: each round's epsilon, and the refusal of a round over budget."""

from __future__ import annotations

from typing import Any

from opacus.accountants import create_accountant

from fl_lightning.config import Config
from fl_lightning.dp_sgd import DPSGDPlan, plan
from fl_lightning.errors import PrivacyBudgetExceeded


class PrivacyLedger:
    """Tracks the run's epsilon at `privacy.delta` and refuses rounds that would exceed it.

    dp_sgd: every client reports its own cumulative epsilon (from its Opacus accountant);
    the ledger logs their max and mean and, before each round, projects each client's
    epsilon after one more round from its DP-SGD plan (the same computation the client's
    accountant makes), assuming every client takes part.

    client_dp: one Gaussian release of the noised mean per round, with the noise
    multiplier over the clipping norm as its noise-to-sensitivity ratio, composed by
    Opacus's accountant (`privacy.accountant`) without sampling amplification (Flower
    samples a fixed number of clients, not a Poisson sample, so none is claimed).
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
        self.rounds_taken = [0] * len(partition_sizes)
        self.reported: dict[int, float] = {}
        self.releases = create_accountant(cfg.privacy.accountant)
        # client_dp: noise std over clipping norm (calibrated once if target_epsilon is set).
        self.client_dp_noise_multiplier = (
            _client_dp_noise_multiplier(cfg) if cfg.privacy.mode == "client_dp" else 0.0
        )

    def projected_epsilon(self) -> float:
        """The largest client epsilon after one more round."""
        if self.cfg.privacy.mode == "dp_sgd":
            # Clients with the same plan and participation share an epsilon: compute each once.
            cases = set(zip(self.plans, self.rounds_taken, strict=True))
            return max(p.epsilon(taken + 1, self.delta) for p, taken in cases)
        accountant = create_accountant(self.cfg.privacy.accountant)
        accountant.history = [*self.releases.history]
        accountant.step(noise_multiplier=self.client_dp_noise_multiplier, sample_rate=1.0)
        return float(accountant.get_epsilon(self.delta))

    def check_next_round(self, server_round: int) -> None:
        """Raise PrivacyBudgetExceeded if round `server_round` would exceed max_epsilon."""
        if self.max_epsilon is None:
            return
        projected = self.projected_epsilon()
        if projected > self.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"round {server_round} not started: it would bring a client to epsilon "
                f"{projected:.3f} > privacy.max_epsilon={self.max_epsilon} (delta "
                f"{self.delta:g}); the model of round {server_round - 1} is the run's last"
            )

    def record_dp_sgd(self, epsilons: dict[int, float]) -> None:
        """dp_sgd: the cumulative epsilon each training client (partition id) reported."""
        for partition, epsilon in epsilons.items():
            self.rounds_taken[partition] += 1
            self.reported[partition] = epsilon

    def record_release(self) -> None:
        """client_dp: one noised aggregate was released."""
        self.releases.step(noise_multiplier=self.client_dp_noise_multiplier, sample_rate=1.0)

    def state(self) -> dict[str, Any]:
        """What the ledger has recorded so far (for --resume)."""
        return {
            "rounds_taken": list(self.rounds_taken),
            "reported": dict(self.reported),
            "releases": list(self.releases.history),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of a killed run."""
        self.rounds_taken = list(state["rounds_taken"])
        self.reported = dict(state["reported"])
        self.releases.history = list(state["releases"])

    def metrics(self) -> dict[str, float]:
        """`epsilon` (the largest client's) and, for dp_sgd, `epsilon_mean` over clients."""
        if self.cfg.privacy.mode == "dp_sgd":
            if not self.reported:
                return {"epsilon": 0.0, "epsilon_mean": 0.0}
            values = list(self.reported.values())
            return {"epsilon": max(values), "epsilon_mean": sum(values) / len(values)}
        if not self.releases.history:
            return {"epsilon": 0.0}
        return {"epsilon": float(self.releases.get_epsilon(self.delta))}


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
