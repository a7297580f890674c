"""One client's round on 1 process and on 2 DDP processes (gloo, CPU), side by side.

    python benchmarks/client_ddp.py --data ../shared/data --repeats 3

Trains one client of the seed MNIST setup (`configs/mnist.yaml`, one client holding
`--samples` samples, `trainer.max_epochs` 1) with `training.fit` as a ClientApp does,
alternating devices=1 and devices=2 (`trainer.strategy=ddp`), `--repeats` times each, in
one process. Prints, as markdown, each round's wall time and the update's size: what DDP
costs per round on this machine (spawning the ranks, importing torch in each, the
all-reduce), not a claim that CPUs train faster on two processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    """Time the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=6000)
    args = parser.parse_args()

    import torch

    from fl_lightning.client import training
    from fl_lightning.config.load import load_config
    from fl_lightning.models.build import build_model

    base = [
        f"data.root={args.data.resolve()}",
        f"data.max_train_samples={args.samples}",
        "federation.num_clients=1",
        "trainer.max_epochs=1",
        "trainer.strategy=ddp",
    ]
    configs = {
        n: load_config(REPO / "configs" / "mnist.yaml", [*base, f"trainer.devices={n}"])
        for n in (1, 2)
    }
    torch.manual_seed(0)
    start = build_model(configs[1]).state_dict()
    times: dict[int, list[float]] = {1: [], 2: []}
    moved: dict[int, float] = {}
    for repeat in range(args.repeats):
        for n, cfg in configs.items():
            began = time.perf_counter()
            result = training.fit(cfg, start, 0, 1, server_round=repeat + 1)
            times[n].append(time.perf_counter() - began)
            assert result.state_dict is not None
            moved[n] = max((result.state_dict[k] - start[k]).abs().max().item() for k in start)
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    print(f"client_ddp: {date.today()}, {machine}")
    print("| devices | rounds (s) | median (s) | largest weight change |")
    print("|---|---|---|---|")
    for n in (1, 2):
        shown = ", ".join(f"{t:.1f}" for t in times[n])
        print(f"| {n} | {shown} | {statistics.median(times[n]):.1f} | {moved[n]:.3f} |")


if __name__ == "__main__":  # DDP spawns its ranks: they import this file without running it
    main()
