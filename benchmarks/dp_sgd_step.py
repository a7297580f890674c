"""One DP-SGD step of MNISTNet on a 2048-sample batch: what per-sample clipping costs.

    python benchmarks/dp_sgd_step.py

Times (the best of `--repeats`, after one warm-up, on torch's default threads) one
optimizer step of the built-in MNISTNet on random 1x28x28 images three ways:

- `no privacy`: loss, backward, SGD step;
- `per-sample gradients`: Opacus's GradSampleModule and DPOptimizer (clip each sample's
  gradient, add noise), which is how fl-lightning's DP-SGD trains any module;
- `ghost clipping`: Opacus's fast gradient clipping (`GradSampleModuleFastGradientClipping`,
  `DPLossFastGradientClipping`): per-sample gradient norms without per-sample gradients,
  and a second backward pass. It needs the loss of each sample, which a Lightning
  module's `training_step` does not return, so fl-lightning cannot use it for any module.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable
from datetime import date

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from fl_lightning.models.networks import MNISTNet

BATCH = 2048


def best(step: Callable[[], None], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `step`, after one untimed."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def steps() -> dict[str, Callable[[], None]]:
    """The three ways to take one step, each on its own copy of the network."""
    torch.manual_seed(0)
    images, labels = torch.randn(BATCH, 1, 28, 28), torch.randint(10, (BATCH,))
    loss = nn.CrossEntropyLoss()

    plain = MNISTNet().net
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)

    def no_privacy() -> None:
        plain_opt.zero_grad()
        loss(plain(images), labels).backward()
        plain_opt.step()

    private = GradSampleModule(MNISTNet().net)
    dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH)
    private_opt = DPOptimizer(torch.optim.SGD(private.parameters(), lr=0.1), **dp)

    def per_sample() -> None:
        private_opt.zero_grad()
        loss(private(images), labels).backward()
        private_opt.step()

    ghost = GradSampleModuleFastGradientClipping(MNISTNet().net, max_grad_norm=1.0)
    ghost_opt = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=0.1), **dp)
    # The wrapper computes each sample's loss itself; the criterion keeps its mean.
    per_sample_loss = DPLossFastGradientClipping(ghost, ghost_opt, nn.CrossEntropyLoss())

    def ghost_clipping() -> None:
        ghost_opt.zero_grad()
        per_sample_loss(ghost(images), labels).backward()
        ghost_opt.step()

    return {
        "no privacy": no_privacy,
        "per-sample gradients": per_sample,
        "ghost clipping": ghost_clipping,
    }


def main() -> None:
    """Time each way, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook notices
    seconds = {name: best(step, args.repeats) for name, step in steps().items()}
    base = seconds["no privacy"]
    print(
        f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} "
        f"cores, {torch.get_num_threads()} torch threads, CPU only) with "
        f"`python benchmarks/dp_sgd_step.py --repeats {args.repeats}`.\n"
    )
    print("| step of MNISTNet, 2048 samples | seconds | vs no privacy |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.2f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
