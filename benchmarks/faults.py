"""Inject client faults into a federated MNIST run and report what the run did.

    python benchmarks/faults.py --data ../shared/data --record BENCHMARKS.md

10 IID clients (configs/mnist.yaml's recipe, 12,000 training samples, 3 rounds of 1 local
epoch, the full test split). Each scenario runs in this process with the fault-injecting
Flower mods of tests/faults.py (a test hook; no config key turns faults on) and reports
the failures and rejected updates counted, the rounds skipped and the final accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import machine, record  # noqa: E402

from tests import faults  # noqa: E402

SETUP = [
    "data.max_train_samples=12000",
    "federation.num_clients=10",
    "federation.num_rounds=3",
    "trainer.max_epochs=1",
]

SCALED = faults.scaled([2, 7], 100.0)
RANDOM = faults.random_weights([2, 7], 1.0)
STRATEGIES = {
    "fedavg": ("FedAvg", []),
    "krum": ("Krum", ["strategy.name=krum", "strategy.num_malicious_clients=2"]),
    "fedmedian": ("FedMedian", ["strategy.name=fedmedian"]),
}

# name -> (what is injected, overrides, mods)
SCENARIOS: dict[str, tuple[str, list[str], list]] = {
    "raises": ("client 3 raises in every message", [], [faults.raising([3])]),
    "nan": ("client 3 sends NaN weights", [], [faults.nan_weights([3])]),
    "wrong_shapes": ("client 3 sends an array of the wrong shape", [], [faults.wrong_shapes([3])]),
    "starved": (
        "clients 0-7 raise; federation.min_train_clients=3",
        ["federation.min_train_clients=3"],
        [faults.raising(range(8))],
    ),
}
for key, (label, overrides) in STRATEGIES.items():
    SCENARIOS[f"clean_{key}"] = (f"nothing; {label}", overrides, [])
    SCENARIOS[f"scaled_{key}"] = (f"clients 2, 7 send weights x100; {label}", overrides, [SCALED])
    SCENARIOS[f"random_{key}"] = (
        f"clients 2, 7 send N(0, 1) weights; {label}",
        overrides,
        [RANDOM],
    )


def run_scenario(name: str, data: Path, workdir: Path) -> dict:
    """One federated run with the scenario's faults; what it counted and reached."""
    from flwr.simulation import run_simulation

    from fl_lightning.client_app import make_client_app
    from fl_lightning.config import load_config
    from fl_lightning.rundir import create_run_dir
    from fl_lightning.server_app import make_server_app
    from fl_lightning.simulation import backend_config

    what, overrides, mods = SCENARIOS[name]
    cfg = load_config(
        REPO / "configs" / "mnist.yaml",
        [f"data.root={data}", *SETUP, *overrides, f"output.dir={workdir / name}"],
    )
    run = create_run_dir(cfg)
    started = time.perf_counter()
    run_simulation(
        server_app=make_server_app(cfg, run, console=False),
        client_app=make_client_app(cfg, mods=mods),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg),
    )
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    rounds = [r for r in records if r["round"] > 0]
    return {
        "scenario": name,
        "injected": what,
        "rounds": len(rounds),
        "failures": sum(r.get("failures", 0) for r in rounds),
        "rejected": sum(r.get("rejected", 0) for r in rounds),
        "train_loss": [r.get("train_loss") for r in rounds],
        "accuracy_per_round": [r["centralized_accuracy"] for r in rounds],
        "final_accuracy": rounds[-1]["centralized_accuracy"],
        "wall_seconds": time.perf_counter() - started,
    }


def markdown(results: list[dict]) -> str:
    """The table, with machine, date and command."""
    lines = [
        f"Measured {date.today().isoformat()} on {machine()} with "
        "`python benchmarks/faults.py --data <data>`.",
        "",
        "| scenario | injected | what the run did | failures counted | updates rejected "
        "| centralized accuracy per round | final |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_round = ", ".join(f"{a:.4f}" for a in r["accuracy_per_round"])
        aggregated = sum(loss is not None for loss in r["train_loss"])
        did = f"completed {r['rounds']} rounds, aggregated {aggregated}"
        if aggregated < r["rounds"]:
            did += f", skipped {r['rounds'] - aggregated} (too few usable updates)"
        lines.append(
            f"| {r['scenario']} | {r['injected']} | {did} | {r['failures']} | {r['rejected']} | "
            f"{per_round} | {r['final_accuracy']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run the scenarios, print (and record) the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run these scenarios")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--record", type=Path, help="markdown file to write the table into")
    args = parser.parse_args()
    names = args.only or list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="fl-faults-") as workdir:
        results = []
        for name in names:
            results.append(run_scenario(name, args.data.resolve(), Path(workdir)))
            print(f"{name}: {results[-1]['accuracy_per_round']}", file=sys.stderr)
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.record:
        record(args.record, "faults", table)


if __name__ == "__main__":
    main()
