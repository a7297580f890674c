"""DP-SGD inside a client's Lightning training: Opacus model fix, Poisson batches, accountant."""

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from fl_lightning.client import training
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.errors import ConfigError
from fl_lightning.models.build import build_model
from fl_lightning.models.module import ImageClassifier
from fl_lightning.privacy.dp_sgd import make_private_compatible, plan, quiet_opacus
from tests.test_config import MNIST, REPO

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.fixture()
def dp_mnist(tiny_overrides: list[str]) -> Config:
    """configs/mnist_dp_sgd.yaml shrunk like the other tiny configs (batches of 64 of 135),
    with the RDP accountant, whose epsilon these tests also compute independently."""
    overrides = [*tiny_overrides, "data.batch_size=64", "privacy.accountant=rdp"]
    return load_config(REPO / "configs" / "mnist_dp_sgd.yaml", overrides)


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` subsampled Gaussian steps, straight from the RDP analysis."""
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])


def test_epsilon_is_cumulative_across_rounds_and_matches_the_accountant(
    dp_mnist: Config,
) -> None:
    torch.manual_seed(0)
    state = build_model(dp_mnist, 10).state_dict()
    first = training.fit(dp_mnist, state, partition_id=0, num_partitions=2, server_round=1)
    assert first.state_dict is not None and first.accountant_state is not None
    second = training.fit(
        dp_mnist,
        first.state_dict,
        partition_id=0,
        num_partitions=2,
        server_round=2,
        accountant_state=first.accountant_state,
    )
    eps_1, eps_2 = first.metrics["privacy/epsilon"], second.metrics["privacy/epsilon"]
    assert 0 < eps_1 < eps_2

    p = plan(dp_mnist, first.num_examples)
    batches = math.ceil(
        first.num_examples / dp_mnist.data.batch_size
    )  # 135 samples / 64: 3 batches
    assert p.steps_per_round == dp_mnist.trainer.max_epochs * batches
    for rounds, eps in ((1, eps_1), (2, eps_2)):
        expected = independent_epsilon(
            p.noise_multiplier, 1 / batches, rounds * p.steps_per_round, dp_mnist.privacy.delta
        )
        assert eps == pytest.approx(expected, rel=1e-9)
        assert p.epsilon(rounds, dp_mnist.privacy.delta) == pytest.approx(expected, rel=1e-9)


def test_target_epsilon_calibrates_the_noise_for_the_whole_run(dp_mnist: Config) -> None:
    p = plan(dp_mnist, 9720)
    delta, rounds = dp_mnist.privacy.delta, dp_mnist.federation.num_rounds
    assert dp_mnist.privacy.target_epsilon == 3.0
    assert 2.9 <= p.epsilon(rounds, delta) <= 3.0
    assert p.epsilon(rounds + 1, delta) > 3.0


def test_the_prv_accountant_calibrates_less_noise_for_the_same_epsilon(dp_mnist: Config) -> None:
    from opacus.accountants import PRVAccountant

    prv = dataclasses.replace(
        dp_mnist, privacy=dataclasses.replace(dp_mnist.privacy, accountant="prv")
    )
    p_rdp, p_prv = plan(dp_mnist, 9720), plan(prv, 9720)
    delta, rounds = dp_mnist.privacy.delta, dp_mnist.federation.num_rounds
    assert p_prv.noise_multiplier < 0.97 * p_rdp.noise_multiplier  # a tighter bound
    assert 2.9 <= p_prv.epsilon(rounds, delta) <= 3.0  # the target, by PRV's own account
    accountant = PRVAccountant()  # Opacus's own PRV, not ours
    accountant.history = [
        (p_prv.noise_multiplier, p_prv.sample_rate, rounds * p_prv.steps_per_round)
    ]
    assert accountant.get_epsilon(delta) == pytest.approx(p_prv.epsilon(rounds, delta))


def test_dp_training_with_reproducible_noise_is_deterministic_and_noisy(
    tiny_overrides: list[str],
) -> None:
    # Secret noise (the default) is tested in test_randomness.py.
    dp_mnist = load_config(
        REPO / "configs" / "mnist_dp_sgd.yaml",
        [*tiny_overrides, "data.batch_size=64", "privacy.reproducible_noise=true"],
    )
    torch.manual_seed(0)
    state = build_model(dp_mnist, 10).state_dict()
    a = training.fit(dp_mnist, state, partition_id=1, num_partitions=2, server_round=1)
    b = training.fit(dp_mnist, state, partition_id=1, num_partitions=2, server_round=1)
    other_round = training.fit(dp_mnist, state, partition_id=1, num_partitions=2, server_round=2)
    assert a.state_dict is not None and b.state_dict is not None
    assert other_round.state_dict is not None
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in state)
    assert not torch.equal(a.state_dict["net.0.weight"], other_round.state_dict["net.0.weight"])


def test_physical_batches_take_the_same_private_steps(tiny_overrides: list[str]) -> None:
    """Chunks of at most 16 samples of each Poisson batch: the same steps, the same noise,
    the same weights (up to float summation order), the same epsilon."""
    base = [
        *tiny_overrides,
        "data.batch_size=64",
        "privacy.reproducible_noise=true",
        "optimizer.scheduler=none",  # Lightning steps a per-step schedule on every chunk
    ]
    dp_sgd = REPO / "configs" / "mnist_dp_sgd.yaml"
    whole = load_config(dp_sgd, base)
    chunked = load_config(dp_sgd, [*base, "privacy.max_physical_batch_size=16"])
    torch.manual_seed(0)
    state = build_model(whole, 10).state_dict()
    a = training.fit(whole, state, partition_id=1, num_partitions=2, server_round=1)
    b = training.fit(chunked, state, partition_id=1, num_partitions=2, server_round=1)
    assert a.state_dict is not None and b.state_dict is not None
    assert a.accountant_state == b.accountant_state  # the same steps, each accounted once
    assert a.metrics["privacy/epsilon"] == b.metrics["privacy/epsilon"]
    for key in state:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], rtol=1e-4, atol=1e-6)
    assert not torch.equal(a.state_dict["net.0.weight"], state["net.0.weight"])


def test_batchnorm_becomes_groupnorm_on_server_and_clients(tmp_path: Path) -> None:
    cfg = load_config(
        MNIST,
        [
            "data.dataset=cifar10",
            "model.name=cifar10_net",
            "privacy.mode=dp_sgd",
            "privacy.noise_multiplier=1.0",
            "trainer.gradient_clip_val=null",
        ],
    )
    model = build_model(cfg, 10)
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds
    assert not any("running_mean" in key for key in model.state_dict())


class FixableNet(ImageClassifier):
    """BatchNorm without affine parameters: Opacus replaces it."""

    def build_network(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10, affine=False))


class ScaleWithRunningStat(nn.Module):
    """A trainable layer with a buffer of data statistics, which Opacus cannot privatise."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))
        self.register_buffer("running_max", torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class UnsupportedNet(ImageClassifier):
    """A layer Opacus has no fix for."""

    def build_network(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), ScaleWithRunningStat())


def test_a_model_opacus_cannot_train_is_a_config_error() -> None:
    make_private_compatible(FixableNet(), "model.name: fixable")
    with pytest.raises(ConfigError, match=r"^model\.class_path: x\.Unsupported cannot be trained"):
        make_private_compatible(UnsupportedNet(), "model.class_path: x.Unsupported")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
        ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
        ("strategy.name=fedprox", "strategy.name"),
        ("privacy.noise_multiplier=1.0", "privacy.noise_multiplier"),  # and target_epsilon
        ("trainer.devices=2", "trainer.devices"),
    ],
)
def test_wrong_dp_sgd_combinations_fail_at_load(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(REPO / "configs" / "mnist_dp_sgd.yaml", [override])


def test_quiet_opacus_silences_the_expected_warnings_only() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_opacus()
        for text in (
            "Detected call of `lr_scheduler.step()` before `optimizer.step()`. ...",
            "Secure RNG turned off. This is perfectly fine for experimentation.",
            "something else",
        ):
            warnings.warn(text, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
