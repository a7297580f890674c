"""Run named federated experiments and print (optionally record) their centralized accuracy.

    python benchmarks/accuracy.py seed --data ../shared/data --record BENCHMARKS.md

Each experiment is `fl-lightning run <config> <overrides>` in a fresh run directory; the
figures come from that run's metrics.jsonl (and clients.json where the run writes one).
Arguments name experiments or groups of them (`seed`, `noisy`, `noniid`, `strategies`,
`dp_sgd`, `client_dp`, `secagg`).
With --record, the markdown replaces the block between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` in the file (NAME: --block, default the arguments joined by '+').
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STRATEGY_NAMES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad",
    "fedavgm", "fedmedian", "fedtrimmedavg", "krum",
)  # fmt: skip
# Strategy comparison: 15,000 MNIST samples over 10 clients with Dirichlet(0.3) label
# skew, 5 rounds of 1 local epoch (configs/mnist.yaml's recipe otherwise).
DIRICHLET = [
    "data.partition=dirichlet", "data.alpha=0.3", "data.max_train_samples=15000",
    "federation.num_clients=10", "federation.num_rounds=5", "trainer.max_epochs=1",
]  # fmt: skip
STRATEGY_PARAMS = {
    "fedadam": ["strategy.eta=0.01"],
    "fedyogi": ["strategy.eta=0.01"],
    "fedadagrad": ["strategy.eta=0.01"],
    "krum": ["strategy.num_malicious_clients=2"],
}

# Clients that remember (#28): 20 rounds of the pathological shards split per strategy,
# and a feature-shift split (client 1's images noisy) of CIFAR-10 for FedBN: 2 clients of
# 5,000 images, CIFAR10Net's BatchNorm layers (net.1, net.5, net.9) kept by each client.
SHARDS = ["federation.num_rounds=20"]
FEATURE_SHIFT = [
    "federation.num_clients=2", "data.max_train_samples=10000", "federation.num_rounds=5",
    "trainer.max_epochs=1", "data.noise.clients=[1]", "data.noise.std=0.3",
    "output.client_report=true", "strategy.batchnorm=average",
]  # fmt: skip
FEDBN = [r"strategy.local_parameters=['net\.(1|5|9)\..*']"]

GPU = ["trainer.accelerator=gpu", "federation.client_resources.num_gpus=1"]
GPU_SHARED = ["trainer.accelerator=gpu", "federation.client_resources.num_gpus=0.2"]

# name -> (config, overrides, data sub-folder)
EXPERIMENTS: dict[str, tuple[str, list[str], str]] = {
    "mnist_seed_recipe": ("configs/mnist_seed_recipe.yaml", [], ""),
    "cifar10_seed_recipe": ("configs/cifar10_seed_recipe.yaml", [], "cifar10"),
    "mnist": ("configs/mnist.yaml", [], ""),
    "cifar10": ("configs/cifar10.yaml", [], "cifar10"),
    "noisy_mlp": ("configs/noisy_mnist.yaml", [], ""),
    "noisy_cnn": ("configs/noisy_mnist_cnn.yaml", [], ""),
    # The same with twice the noise, a harder setting than the seed's results suggest.
    "noisy_mlp_std05": ("configs/noisy_mnist.yaml", ["data.noise.std=0.5"], ""),
    "mnist_shards": ("configs/mnist_shards.yaml", [], ""),
    # Privacy: DP-SGD (epsilon <= 3), client-level DP at two noise levels, SecAgg+.
    "mnist_dp_sgd": ("configs/mnist_dp_sgd.yaml", [], ""),
    "client_dp_z0.5": ("configs/mnist_client_dp.yaml", ["privacy.noise_multiplier=0.5"], ""),
    "client_dp_z1.0": ("configs/mnist_client_dp.yaml", ["privacy.noise_multiplier=1.0"], ""),
    "client_dp_off": ("configs/mnist_client_dp.yaml", ["privacy.mode=none"], ""),
    "mnist_secagg": ("configs/mnist_secagg.yaml", [], ""),
    "mnist_secagg_off": ("configs/mnist_secagg.yaml", ["secure_aggregation.enabled=false"], ""),
    "cifar10_seed_recipe_stateful": (
        "configs/cifar10_seed_recipe.yaml",
        ["federation.stateful_clients=true"],
        "cifar10",
    ),
    "shards_fedavg": ("configs/mnist_shards.yaml", SHARDS, ""),
    "shards_scaffold": ("configs/mnist_shards.yaml", [*SHARDS, "strategy.name=scaffold"], ""),
    "shards_fedprox": ("configs/mnist_shards.yaml", [*SHARDS, "strategy.name=fedprox"], ""),
    "feature_shift_fedavg": ("configs/cifar10.yaml", FEATURE_SHIFT, "cifar10"),
    "feature_shift_fedbn": ("configs/cifar10.yaml", [*FEATURE_SHIFT, *FEDBN], "cifar10"),
    # CUDA (run where a GPU is): each client on the whole GPU, or 5 clients sharing one.
    "mnist_gpu": ("configs/mnist.yaml", GPU, ""),
    "mnist_gpu_shared": ("configs/mnist.yaml", GPU_SHARED, ""),
    "cifar10_gpu": ("configs/cifar10.yaml", GPU, "cifar10"),
    "cifar10_gpu_shared": ("configs/cifar10.yaml", GPU_SHARED, "cifar10"),
    **{
        f"dirichlet_{name}": (
            "configs/mnist.yaml",
            [*DIRICHLET, f"strategy.name={name}", *STRATEGY_PARAMS.get(name, [])],
            "",
        )
        for name in STRATEGY_NAMES
    },
}
GROUPS = {
    "seed": ["mnist", "cifar10"],
    "noisy": ["noisy_mlp", "noisy_cnn", "noisy_mlp_std05"],
    "noniid": ["mnist_shards", "dirichlet_fedavg"],
    "strategies": [f"dirichlet_{name}" for name in STRATEGY_NAMES],
    "dp_sgd": ["mnist_dp_sgd"],
    "client_dp": ["client_dp_off", "client_dp_z0.5", "client_dp_z1.0"],
    "secagg": ["mnist_secagg_off", "mnist_secagg"],
    "remember": [
        "cifar10_seed_recipe",
        "cifar10_seed_recipe_stateful",
        "shards_fedavg",
        "shards_scaffold",
        "shards_fedprox",
    ],
    "fedbn": ["feature_shift_fedavg", "feature_shift_fedbn"],
    "gpu_mnist": ["mnist_gpu", "mnist_gpu_shared"],
    "gpu_cifar10": ["cifar10_gpu", "cifar10_gpu_shared"],
}


def run_experiment(name: str, data: Path, workdir: Path, repeat: int = 0) -> dict:
    """Run one experiment and return its rounds, wall time and accuracies."""
    config, overrides, sub = EXPERIMENTS[name]
    run_dir = workdir / f"{name}-{repeat}"
    root = f"data.root={data / sub}"
    command = [sys.executable, "-m", "fl_lightning.cli", "run", config, root, *overrides]
    started = time.perf_counter()
    subprocess.run(
        [*command, f"output.dir={run_dir}"], cwd=REPO, check=True, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["test/accuracy"] for r in records if r["round"] > 0]
    epsilon = [r["epsilon"] for r in records if r["round"] > 0 and "epsilon" in r]
    clients = run_dir / "clients.json"
    return {
        "experiment": f"{name} #{repeat + 1}" if repeat else name,
        "command": " ".join(["fl-lightning", *command[3:]]),
        "rounds": len(accuracy),
        "wall_seconds": wall,
        "accuracy_per_round": accuracy,
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
        "round_seconds": [r["seconds"] for r in records if r["round"] > 0],
        "epsilon_per_round": epsilon,
        "stopped": (run_dir / "stopped.txt").read_text().strip()
        if (run_dir / "stopped.txt").exists()
        else None,
        "clients": json.loads(clients.read_text()) if clients.exists() else None,
    }


def markdown(results: list[dict], invocation: str, script: str = "benchmarks/accuracy.py") -> str:
    """Tables of the results, with the machine and date they were measured on."""
    command = " ".join(["python", script, *invocation.split(), "--data <data>"])
    lines = [
        f"Measured {date.today().isoformat()} on {machine()} with `{command}`.",
        "",
        "| experiment | rounds | wall time (s) | final | best | final epsilon "
        "| centralized accuracy per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_round = ", ".join(f"{a:.4f}" for a in r["accuracy_per_round"])
        if len(r["accuracy_per_round"]) > 12:
            per_round = f"{per_round[:60]} ... (curve: see JSON / TensorBoard)"
        epsilon = f"{r['epsilon_per_round'][-1]:.2f}" if r["epsilon_per_round"] else "-"
        lines.append(
            f"| {r['experiment']} | {r['rounds']} | {r['wall_seconds']:.0f} | "
            f"{r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {epsilon} | {per_round} |"
        )
    for r in results:
        if r["epsilon_per_round"]:
            values = ", ".join(f"{e:.2f}" for e in r["epsilon_per_round"])
            lines += ["", f"{r['experiment']}: epsilon after each round: {values}."]
        if r["stopped"]:
            lines += ["", f"{r['experiment']} stopped early: {r['stopped']}"]
    lines += spread(results)
    commands = {r["command"]: r["experiment"].split(" #")[0] for r in results}
    lines += ["", "Commands:", ""] + [f"- `{name}`: `{cmd}`" for cmd, name in commands.items()]
    for r in results:
        if r["clients"]:
            lines += [
                "",
                f"{r['experiment']}: each client's own kind of test data (clean or noisy).",
                "",
                "| client | data | accuracy before FL (alone) | accuracy after FL |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {c['client']} | {'noisy' if c['noisy'] else 'clean'} | "
                f"{c['before_fl_accuracy']:.4f} | {c['after_fl_accuracy']:.4f} |"
                for c in r["clients"]
            ]
    return "\n".join(lines)


def spread(results: list[dict]) -> list[str]:
    """One line per repeated experiment: its final accuracy and epsilon over the repeats."""
    lines = []
    for name in dict.fromkeys(r["experiment"].split(" #")[0] for r in results):
        runs = [r for r in results if r["experiment"].split(" #")[0] == name]
        if len(runs) < 2:
            continue
        finals = [r["final_accuracy"] for r in runs]
        mean = sum(finals) / len(finals)
        lines += [
            "",
            f"{name}, {len(runs)} runs: final accuracy min {min(finals):.4f}, mean {mean:.4f}, "
            f"max {max(finals):.4f}"
            + (
                f"; final epsilon max {max(r['epsilon_per_round'][-1] for r in runs):.2f}"
                if all(r["epsilon_per_round"] for r in runs)
                else ""
            )
            + ".",
        ]
    return lines


def machine() -> str:
    """This machine in words: architecture, cores and GPU (nvidia-smi's name), if any."""
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        gpus = ", ".join(n.strip() for n in names if n.strip()) or "no GPU"
    except (OSError, subprocess.CalledProcessError):
        gpus = "CPU only"
    return f"{platform.machine()} ({os.cpu_count() or 1} cores, {gpus})"


def record(path: Path, block: str, table: str) -> None:
    """Replace (or append) the block named `block` in `path` with `table`."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main() -> None:
    """Parse arguments, run the experiments, print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="+", choices=sorted([*EXPERIMENTS, *GROUPS]))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--record", type=Path, help="markdown file to write the tables into")
    parser.add_argument("--block", help="name of the block in --record (default: the names)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--repeats", type=int, default=1, help="run each experiment N times")
    args = parser.parse_args()
    experiments = [e for name in args.names for e in GROUPS.get(name, [name])]
    with tempfile.TemporaryDirectory(prefix="fl-accuracy-") as workdir:
        results = []
        for name in experiments:
            for repeat in range(args.repeats):
                results.append(run_experiment(name, args.data.resolve(), Path(workdir), repeat))
                print(f"{name}: {results[-1]['accuracy_per_round']}", file=sys.stderr)
    repeats = f" --repeats {args.repeats}" if args.repeats > 1 else ""
    table = markdown(results, " ".join(args.names) + repeats)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.record:
        record(args.record, args.block or "+".join(args.names), table)


if __name__ == "__main__":
    main()
