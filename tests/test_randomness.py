"""DP randomness: secret by default, seeded only on request, calibrated to what was averaged."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fl_lightning.client import training
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.models.build import build_model
from fl_lightning.privacy.ledger import PrivacyLedger
from fl_lightning.privacy.randomness import numpy_generator, torch_generator
from fl_lightning.server.secure import AccountedClientSideClipping
from tests.test_config import MNIST, REPO
from tests.test_strategy import recorder


def dp_sgd_config(tiny_overrides: list[str], *extra: str) -> Config:
    return load_config(
        REPO / "configs" / "mnist_dp_sgd.yaml", [*tiny_overrides, "data.batch_size=64", *extra]
    )


def trained_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """One client's DP-SGD round from a fixed initial model, as the ClientApp runs it."""
    torch.manual_seed(0)
    state = build_model(cfg, 10).state_dict()
    result = training.fit(cfg, state, partition_id=0, num_partitions=2, server_round=1)
    assert result.state_dict is not None
    return result.state_dict


def test_dp_sgd_noise_and_sampling_are_secret_by_default(tiny_overrides: list[str]) -> None:
    cfg = dp_sgd_config(tiny_overrides)
    first, second = trained_weights(cfg), trained_weights(cfg)
    # Same seed, same data, same initial model: only the secret draws differ.
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_reproducible_noise_is_an_opt_in_that_repeats_exactly(tiny_overrides: list[str]) -> None:
    cfg = dp_sgd_config(tiny_overrides, "privacy.reproducible_noise=true")
    first, second = trained_weights(cfg), trained_weights(cfg)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_generators_are_seeded_only_when_asked() -> None:
    secret = load_config(MNIST, ["privacy.mode=client_dp", "privacy.noise_multiplier=1"]).privacy
    seeded = load_config(
        MNIST,
        ["privacy.mode=client_dp", "privacy.noise_multiplier=1", "privacy.reproducible_noise=true"],
    ).privacy
    draw = lambda p: numpy_generator(p, seed=42, server_round=3).normal(size=8)  # noqa: E731
    assert not np.array_equal(draw(secret), draw(secret))
    np.testing.assert_array_equal(draw(seeded), draw(seeded))
    sample = lambda p: torch.randn(8, generator=torch_generator(p, seed=42))  # noqa: E731
    assert not torch.equal(sample(secret), sample(secret))
    assert torch.equal(sample(seeded), sample(seeded))


class _Zeros:
    """A legacy inner strategy whose aggregate is all zeros: the wrapper's output is its noise."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.current = [np.zeros(400_000, np.float32)]
        self.recorder = recorder()

    def adopted(self, arrays: list, server_round: int) -> bool:
        return True  # its test of the released model passes

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        return ndarrays_to_parameters([np.zeros(400_000, np.float32)]), {}


def test_secure_client_dp_noise_is_what_the_ledger_assumes_when_clients_drop_out() -> None:
    # 5 clients sampled, 2 dropped out of SecAgg+: the sum holds 3 updates.
    cfg = load_config(
        MNIST,
        ["privacy.mode=client_dp", "privacy.noise_multiplier=2.0", "privacy.clipping_norm=0.5",
         "privacy.clipping=client"],
    )  # fmt: skip
    ledger = PrivacyLedger(cfg, [100] * 5)
    wrapper = AccountedClientSideClipping(_Zeros(cfg), ledger)  # type: ignore[arg-type]
    results = [(SimpleNamespace(), SimpleNamespace())] * 3
    parameters, _ = wrapper.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert parameters is not None
    noise = parameters_to_ndarrays(parameters)[0]
    # The std the ledger's epsilon assumes: a sum of clipped updates over the 5 sampled.
    assumed = ledger.client_dp_noise_multiplier * 0.5 / 5
    assert noise.std() == pytest.approx(assumed, rel=0.01)
    assert len(ledger.releases.history) == 1
