"""The server's privacy ledger: epsilon per round, and the refusal of a round over budget."""

import json
import math

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fl_lightning.config.load import load_config
from fl_lightning.errors import PrivacyBudgetExceeded
from fl_lightning.privacy.ledger import PrivacyLedger
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
            ledger.within_budget(server_round, range(5))
            ledger.record_release()
            server_round += 1
    assert server_round > 1  # some rounds fit
    assert ledger.metrics()["epsilon"] <= 3.0 < ledger.projected_epsilon()


DP_SGD = REPO / "configs" / "mnist_dp_sgd.yaml"


def test_dp_sgd_epsilon_is_the_servers_own_from_each_plan_and_the_rounds_sent() -> None:
    cfg = load_config(DP_SGD)
    sizes = [9720, 4000]
    ledger = PrivacyLedger(cfg, sizes)
    delta = cfg.privacy.delta
    # Each client calibrates its own noise (its own sample rate) to end at target_epsilon.
    assert all(p.epsilon(cfg.federation.num_rounds, delta) <= 3.0 for p in ledger.plans)
    assert ledger.plans[0].noise_multiplier != ledger.plans[1].noise_multiplier
    assert ledger.projected_epsilon() == pytest.approx(
        max(p.epsilon(1, delta) for p in ledger.plans)
    )
    ledger.record_sampled([1])  # only client 1 is sent training this round
    assert ledger.sampled == [0, 1]
    assert ledger.projected_epsilon() == pytest.approx(
        max(ledger.plans[0].epsilon(1, delta), ledger.plans[1].epsilon(2, delta))
    )
    ledger.record_sampled([0, 1])
    expected = [ledger.plans[0].epsilon(1, delta), ledger.plans[1].epsilon(2, delta)]
    assert ledger.metrics() == pytest.approx(
        {"epsilon": max(expected), "epsilon_mean": sum(expected) / 2}
    )


def accountant_json(noise: float, rate: float, steps: int) -> str:
    """What a DP-SGD client sends: its Opacus accountant's state as JSON."""
    return json.dumps({"history": [[noise, rate, steps]], "mechanism": "prv"})


def test_a_reported_epsilon_must_be_what_the_clients_plan_gives() -> None:
    cfg = load_config(DP_SGD)
    ledger = PrivacyLedger(cfg, [9720, 9720])
    plan = ledger.plans[0]
    ledger.record_sampled([0, 1])
    honest = accountant_json(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    epsilon = plan.epsilon(1, cfg.privacy.delta)
    assert ledger.verified_rounds(0, epsilon, honest) == 1
    assert ledger.verified_rounds(0, epsilon, None) == 1  # SecAgg+: the epsilon alone
    for lie, state in [
        (1e300, honest),  # the review's attack: it became the run's logged epsilon
        (epsilon * 0.5, honest),
        (epsilon, accountant_json(plan.noise_multiplier * 2, plan.sample_rate, 18)),
        (epsilon, accountant_json(plan.noise_multiplier, plan.sample_rate, 2 * 18)),  # 2 rounds
        (epsilon, accountant_json(plan.noise_multiplier, plan.sample_rate, 17)),
        (math.nan, honest),
    ]:
        assert isinstance(ledger.verified_rounds(1, lie, state), str), (lie, state)
    ledger.record_trained(0, 1)
    # A round already credited cannot be reported again.
    assert isinstance(ledger.verified_rounds(0, epsilon, honest), str)
    # Whatever was reported, the logged epsilon is the server's: plans and rounds sent.
    assert ledger.metrics()["epsilon"] == pytest.approx(epsilon)


def test_a_client_past_its_budget_stops_alone() -> None:
    # A client claiming 1 sample (sample rate 1) spends far more per round than the others:
    # it is left out, and the others go on, instead of the run ending for everybody.
    cfg = load_config(DP_SGD, ["privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"])
    ledger = PrivacyLedger(cfg, [9720, 9720, 1])
    delta = cfg.privacy.delta
    honest, liar = ledger.plans[0].epsilon(1, delta), ledger.plans[2].epsilon(1, delta)
    assert honest < liar
    ledger.max_epsilon = (honest + liar) / 2
    assert ledger.within_budget(1, [0, 1, 2]) == [0, 1]
    ledger.record_sampled([0, 1])
    with pytest.raises(PrivacyBudgetExceeded, match="round 2 not started"):
        ledger.within_budget(2, [0, 1, 2])  # now nobody has room for another round


def test_a_budget_that_leaves_too_few_for_a_round_ends_the_run() -> None:
    # 10 clients, half sampled, at least 5 usable updates a round. Once one client is out of
    # budget, Flower samples int(9 * 0.5) = 4: every later round would spend epsilon on 4
    # clients and be skipped. The run ends instead.
    cfg = load_config(
        DP_SGD,
        ["privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
         "federation.num_clients=10", "federation.fraction_train=0.5",
         "federation.min_train_clients=5"],
    )  # fmt: skip
    ledger = PrivacyLedger(cfg, [9720] * 9 + [1])
    delta = cfg.privacy.delta
    ledger.max_epsilon = (ledger.plans[0].epsilon(1, delta) + ledger.plans[9].epsilon(1, delta)) / 2
    with pytest.raises(PrivacyBudgetExceeded, match="round 1 not started"):
        ledger.within_budget(1, range(10))
    ledger.max_epsilon = ledger.plans[9].epsilon(1, delta) * 2  # room for everybody
    assert ledger.within_budget(1, range(10)) == list(range(10))


def test_a_resumed_run_with_secret_noise_charges_the_interrupted_round_twice() -> None:
    # The killed run may have trained (and released) the interrupted round already; the
    # resumed run does it again with fresh noise.
    cfg = load_config(DP_SGD)
    ledger = PrivacyLedger(cfg, [9720] * 3)
    ledger.charge_interrupted_round()
    ledger.record_sampled([0, 2])
    ledger.record_sampled([0, 1, 2])
    assert ledger.sampled == [3, 1, 3]
    releases = ["privacy.mode=client_dp", "privacy.noise_multiplier=1.0"]
    client_dp = PrivacyLedger(load_config(MNIST, releases), [5] * 3)
    client_dp.charge_interrupted_round()
    assert len(client_dp.releases.history) == 1
