"""The server's privacy ledger: epsilon per round, and the refusal of a round over budget."""

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fl_lightning.config import load_config
from fl_lightning.errors import PrivacyBudgetExceeded
from fl_lightning.privacy_ledger import PrivacyLedger
from tests.test_config import MNIST, REPO

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def test_client_dp_epsilon_composes_one_gaussian_release_per_round() -> None:
    cfg = load_config(MNIST, ["privacy.mode=client_dp", "privacy.noise_multiplier=1.0"])
    ledger = PrivacyLedger(cfg, [100] * 5)
    assert ledger.metrics() == {"epsilon": 0.0}
    epsilons = []
    for _ in range(3):
        ledger.record_release()
        epsilons.append(ledger.metrics()["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    # Three releases of the Gaussian mechanism at noise multiplier 1, no amplification.
    rdp = compute_rdp(q=1.0, noise_multiplier=1.0, steps=3, orders=ORDERS)
    expected = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=cfg.privacy.delta)[0]
    assert epsilons[2] == pytest.approx(expected, rel=1e-9)


def test_a_round_past_max_epsilon_is_refused_before_it_starts() -> None:
    cfg = load_config(
        MNIST,
        ["privacy.mode=client_dp", "privacy.noise_multiplier=2.0", "privacy.max_epsilon=3.0"],
    )
    ledger = PrivacyLedger(cfg, [100] * 5)
    server_round = 1
    with pytest.raises(PrivacyBudgetExceeded, match=r"round \d+ not started.*max_epsilon=3.0"):
        while True:
            ledger.check_next_round(server_round)
            ledger.record_release()
            server_round += 1
    assert server_round > 1  # some rounds fit
    assert ledger.metrics()["epsilon"] <= 3.0 < ledger.projected_epsilon()


def test_dp_sgd_projection_uses_each_clients_plan_and_participation() -> None:
    cfg = load_config(REPO / "configs" / "mnist_dp_sgd.yaml")
    sizes = [9720, 4000]
    ledger = PrivacyLedger(cfg, sizes)
    delta = cfg.privacy.delta
    # Each client calibrates its own noise (its own sample rate) to end at target_epsilon.
    assert all(p.epsilon(cfg.federation.num_rounds, delta) <= 3.0 for p in ledger.plans)
    assert ledger.plans[0].noise_multiplier != ledger.plans[1].noise_multiplier
    assert ledger.projected_epsilon() == pytest.approx(
        max(p.epsilon(1, delta) for p in ledger.plans)
    )
    ledger.record_dp_sgd({1: 2.0})  # only client 1 trained this round
    assert ledger.rounds_taken == [0, 1]
    assert ledger.projected_epsilon() == pytest.approx(
        max(ledger.plans[0].epsilon(1, delta), ledger.plans[1].epsilon(2, delta))
    )
    ledger.record_dp_sgd({0: 1.0})
    assert ledger.metrics() == {"epsilon": 2.0, "epsilon_mean": 1.5}
