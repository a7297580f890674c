"""One DP-SGD step of MNISTNet: what per-sample clipping costs, per sample.

    python benchmarks/dp_sgd_step.py --batches 64 256 2048 --threads 1

Times (the median of `--repeats`, after one warm-up) one optimizer step of the built-in
MNISTNet on a batch of random 1x28x28 images, for each batch size (a physical batch:
`privacy.max_physical_batch_size` cuts the recipe's 2048-sample batches into these), four
ways:

- `no privacy`: loss, backward, SGD step;
- `hooks` (`privacy.grad_sample_mode=hooks`): Opacus's GradSampleModule and DPOptimizer,
  every layer's per-sample gradients, clipped, summed, noised;
- `ghost`: Opacus's fast gradient clipping (`GradSampleModuleFastGradientClipping`,
  `DPLossFastGradientClipping`): norms without per-sample gradients, then a second
  backward pass. It needs each sample's loss, which a Lightning module's `training_step`
  does not return, so fl-lightning does not use it;
- `fast` (`privacy.grad_sample_mode=fast`, the default): `fl_lightning.privacy.fast_clipping`,
  the same clipping from each layer's input and output gradient.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
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
from fl_lightning.privacy.fast_clipping import FastClipping, FastDPOptimizer, fast_layers


def median(step: Callable[[], None], repeats: int) -> float:
    """The median of `repeats` timed calls of `step`, after one untimed."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def steps(batch: int) -> dict[str, Callable[[], None]]:
    """The four ways to take one step, each on its own copy of the network."""
    torch.manual_seed(0)
    images, labels = torch.randn(batch, 1, 28, 28), torch.randint(10, (batch,))
    loss = nn.CrossEntropyLoss()

    plain = MNISTNet().net
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)

    def no_privacy() -> None:
        plain_opt.zero_grad()
        loss(plain(images), labels).backward()
        plain_opt.step()

    private = GradSampleModule(MNISTNet().net)
    dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
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

    net = MNISTNet().net
    layers = fast_layers(net)
    assert layers is not None
    fast_opt = FastDPOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1), clipping=FastClipping(layers), **dp
    )

    def fast() -> None:
        fast_opt.zero_grad()
        loss(net(images), labels).backward()
        fast_opt.step()

    return {"no privacy": no_privacy, "hooks": per_sample, "ghost": ghost_clipping, "fast": fast}


def main() -> None:
    """Time each way, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 2048])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a client: 1)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook notices
    print(
        f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} "
        f"cores, {args.threads} torch threads, CPU only) with `python "
        f"benchmarks/dp_sgd_step.py --batches {' '.join(map(str, args.batches))} "
        f"--threads {args.threads} --repeats {args.repeats}`; ms per sample.\n"
    )
    print("| batch | no privacy | hooks | ghost | fast | fast vs hooks |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        ms = {
            name: 1000 * median(step, args.repeats) / batch for name, step in steps(batch).items()
        }
        row = " | ".join(f"{value:.3f}" for value in ms.values())
        print(f"| {batch} | {row} | {ms['fast'] / ms['hooks']:.2f}x |")


if __name__ == "__main__":
    main()
