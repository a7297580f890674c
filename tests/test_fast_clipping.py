"""Fast per-sample clipping: Opacus's clipped sums without Opacus's per-sample gradients."""

from collections.abc import Callable

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from fl_lightning.client import training
from fl_lightning.config.load import load_config
from fl_lightning.models.build import build_model
from fl_lightning.models.networks import MNISTNet
from fl_lightning.privacy.dp_sgd import quiet_opacus
from fl_lightning.privacy.fast_clipping import FastClipping, FastDPOptimizer, fast_layers
from tests.test_config import REPO


class Shapes(nn.Module):
    """Conv2d with stride, padding and dilation, no bias; Linear on a sequence; a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1, dilation=2, bias=False)
        self.seq = nn.Linear(4, 5)
        self.head = nn.Linear(5 * 9, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # (n, 9 positions, 4)
        return self.head(torch.tanh(self.seq(h)).flatten(1))


class Twice(nn.Module):
    """One Linear layer run twice in a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MNISTNet": (lambda: MNISTNet().net, (1, 28, 28)),
    "shapes": (Shapes, (3, 7, 7)),
    "twice": (Twice, (6,)),
}


def clipped_sum(
    make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, fast: bool, norm: float
) -> list[torch.Tensor]:
    """One noiseless private step's clipped sum for each parameter, by either engine."""
    torch.manual_seed(0)
    module = make()
    params = [p for p in module.parameters() if p.requires_grad]
    dp = dict(noise_multiplier=0.0, max_grad_norm=norm, expected_batch_size=max(len(x), 1))
    if fast:
        layers = fast_layers(module)
        assert layers is not None
        optimizer: DPOptimizer = FastDPOptimizer(
            torch.optim.SGD(params, lr=0.1), clipping=FastClipping(layers), **dp
        )
    else:
        module = GradSampleModule(module)
        optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.1), **dp)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(module(x), y)
    optimizer.zero_grad()  # as Lightning: between the forward and the backward
    loss.backward()
    optimizer.pre_step()
    return [p.grad.clone() for p in params]  # type: ignore[union-attr]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("norm", [0.05, 1e3])  # every sample clipped; none
def test_the_clipped_sums_are_opacus_s(case: str, norm: float) -> None:
    quiet_opacus()
    make, shape = CASES[case]
    torch.manual_seed(1)
    x, y = torch.randn(16, *shape), torch.randint(3, (16,))
    opacus = clipped_sum(make, x, y, fast=False, norm=norm)
    fast = clipped_sum(make, x, y, fast=True, norm=norm)
    for a, b in zip(opacus, fast, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in fast)


def test_an_empty_batch_sums_to_zero() -> None:
    quiet_opacus()
    grads = clipped_sum(
        CASES["MNISTNet"][0], torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), True, 1.0
    )
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_evaluation_mode_records_nothing() -> None:
    net = MNISTNet().net
    layers = fast_layers(net)
    assert layers is not None and len(layers) == 5
    clipping = FastClipping(layers)
    net.eval()
    net(torch.randn(4, 1, 28, 28)).sum().backward()
    assert clipping.clipped_sums(1.0) == {}


class Tied(nn.Module):
    """The same weight in two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight


class SubLinear(nn.Linear):
    """A subclass: its forward may compute something else."""


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)),
        nn.Conv2d(2, 4, 3, groups=2),
        nn.Conv2d(1, 4, 3, padding="same"),
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
        SubLinear(3, 3),
        Tied(),
        weight_norm(nn.Linear(3, 3)),
    ],
    ids=["groupnorm", "groups", "padding-same", "reflect", "subclass", "tied", "parametrized"],
)
def test_modules_it_cannot_compute_keep_opacus_s_hooks(module: nn.Module) -> None:
    assert fast_layers(module) is None


def test_a_client_trains_the_same_with_either_mode(tiny_overrides: list[str]) -> None:
    """The same private steps, noise and accountant through the client's Lightning fit."""
    base = [*tiny_overrides, "data.batch_size=64", "privacy.reproducible_noise=true"]
    dp_sgd = REPO / "configs" / "mnist_dp_sgd.yaml"
    runs = {}
    for mode in ("hooks", "fast"):
        cfg = load_config(dp_sgd, [*base, f"privacy.grad_sample_mode={mode}"])
        torch.manual_seed(0)
        model = build_model(cfg, 10)
        assert fast_layers(model) is not None  # so "fast" is not Opacus's hooks again
        state = model.state_dict()
        runs[mode] = training.fit(cfg, state, partition_id=1, num_partitions=2, server_round=1)
    hooks, fast = runs["hooks"], runs["fast"]
    assert hooks.state_dict is not None and fast.state_dict is not None
    assert hooks.accountant_state == fast.accountant_state
    assert hooks.metrics["privacy/epsilon"] == fast.metrics["privacy/epsilon"] > 0
    for key, value in hooks.state_dict.items():
        torch.testing.assert_close(fast.state_dict[key], value, rtol=1e-4, atol=1e-6)
    assert not torch.equal(fast.state_dict["net.0.weight"], state["net.0.weight"])
