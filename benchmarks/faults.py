"""Inject client faults and attacks into a federated MNIST run and report what the run did.

    python benchmarks/faults.py --set all --data ../shared/data --record BENCHMARKS.md

10 IID clients (configs/mnist.yaml's recipe, 12,000 training samples, 3 rounds of 1 local
epoch, the full test split). Each scenario runs in this process with the Flower mods of
tests/faults.py and tests/attacks.py (test hooks; no config key turns them on) and reports
the failures and rejected updates counted, the rounds skipped and the final accuracy.

`--set faults` (the default): failing clients and poisoned updates, against three strategies.
`--set security`: client 3 sends one malicious train reply every round, one attack per
scenario; each is compared with the reference run in which client 3 fails its training
instead (the screen must leave the run exactly as if that client had failed).
`--quick` shrinks the setup (2,000 samples, 5 clients, 1 round) and runs two scenarios of
each chosen set: a smoke test of the script, never a figure to record.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import machine, record  # noqa: E402
from flwr.app import MessageType, RecordDict  # noqa: E402
from flwr.clientapp.typing import Mod  # noqa: E402

from tests import attacks, faults  # noqa: E402

SETUP = [
    "data.max_train_samples=12000",
    "federation.num_clients=10",
    "federation.num_rounds=3",
    "trainer.max_epochs=1",
]
QUICK = [
    "data.max_train_samples=2000",
    "federation.num_clients=5",
    "federation.num_rounds=1",
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
SCENARIOS: dict[str, tuple[str, list[str], list[Mod]]] = {
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


def above_partition(content: RecordDict) -> None:
    """Claim one training example more than the client holds (its census answer)."""
    metrics = content.metric_records["metrics"]
    metrics["num-examples"] = int(metrics["num-examples"]) + 1  # type: ignore[arg-type]


ATTACKER = 3
REFERENCE = "reference"
# name -> (the attack, what client 3 does to each of its train replies); None: it fails.
SECURITY: dict[str, tuple[str, attacks.Attack | None]] = {
    REFERENCE: ("none: client 3 raises in every train message instead", None),
    "num_examples_1e12": ("`num-examples` 1e12", attacks.metric("num-examples", 10**12)),
    "num_examples_nan": ("`num-examples` NaN", attacks.metric("num-examples", math.nan)),
    "num_examples_0": ("`num-examples` 0", attacks.metric("num-examples", 0)),
    "num_examples_negative": ("`num-examples` -100", attacks.metric("num-examples", -100)),
    "num_examples_float": ("`num-examples` 100.5", attacks.metric("num-examples", 100.5)),
    "num_examples_above": ("`num-examples` one above its partition's size", above_partition),
    "scalar_as_array": ("float32 array declared, one scalar carried", attacks.scalar_as_array),
    "float64_1e300": ("float64 1e300 declared float32", attacks.float64_as_float32),
    "unknown_stype": ("unknown serialization type (`torch.pickle`)", attacks.unknown_stype),
    "garbage_bytes": ("bytes that are no array", attacks.garbage_bytes),
    "foreign_partition": ("claims partition 0 (client 0's)", attacks.partition_id(0)),
    "partition_out_of_range": ("claims partition 10 (out of range)", attacks.partition_id(10)),
    "partition_a_string": ("claims partition '3' (a string)", attacks.partition_id("3")),
    "no_partition": ("sends no partition id", attacks.no_partition_id),
    "extra_metric": ("an extra metric (`train/secret`)", attacks.metric("train/secret", 1.0)),
    "missing_metric": ("`train/accuracy` left out", attacks.missing_metric("train/accuracy")),
    "list_metric": ("`train/loss` a list", attacks.metric("train/loss", [1.0, 2.0])),
}
SETS = {"faults": list(SCENARIOS), "security": list(SECURITY)}


def scenario(name: str, rounds: int) -> tuple[str, list[str], list[Mod]]:
    """What scenario `name` injects, its overrides and its mods (in a run of `rounds`)."""
    if name in SCENARIOS:
        return SCENARIOS[name]
    what, attack = SECURITY[name]
    if attack is None:  # the run the attacks must equal: client 3's train reply never used
        return what, [], [faults.raising([ATTACKER], message_types=[MessageType.TRAIN])]
    plan = attacks.every_round(attack, range(1, rounds + 1))
    return what, [], [attacks.attacking(ATTACKER, plan, {})]


class Rejections(logging.Handler):
    """Collects the reasons the reply screen logs for the replies it rejects."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the reason of a rejection warning, drop every other line."""
        _, rejected, reason = record.getMessage().partition(" rejected: ")
        if rejected:
            self.reasons.append(reason.removesuffix(" (repeats are counted, not shown)"))


def simulate(name: str, setup: list[str], data: Path, workdir: Path) -> tuple[Path, str | None]:
    """Run scenario `name`; its metrics.jsonl and the one-line error it ended with, if any."""
    from flwr.simulation import run_simulation

    from fl_lightning.client_app import make_client_app
    from fl_lightning.config import load_config
    from fl_lightning.errors import NothingTrained
    from fl_lightning.rundir import create_run_dir
    from fl_lightning.server_app import make_server_app
    from fl_lightning.simulation import backend_config

    base = load_config(REPO / "configs" / "mnist.yaml", setup)
    _, overrides, mods = scenario(name, base.federation.num_rounds)
    cfg = load_config(
        REPO / "configs" / "mnist.yaml",
        [f"data.root={data}", *setup, *overrides, f"output.dir={workdir / name}"],
    )
    run = create_run_dir(cfg)
    try:
        run_simulation(
            server_app=make_server_app(cfg, run, console=False),
            client_app=make_client_app(cfg, mods=mods),
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),
        )
    except NothingTrained as err:  # the product's own end for a run that trained nothing
        return run.metrics, " ".join(str(err).split())
    return run.metrics, None


def run_scenario(name: str, setup: list[str], data: Path, workdir: Path) -> dict:
    """One federated run with the scenario's faults; what it counted and reached."""
    rejections = Rejections()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(rejections)
    started = time.perf_counter()
    try:
        metrics, error = simulate(name, setup, data, workdir)
    finally:
        flwr_logger.removeHandler(rejections)
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rounds = [r for r in map(json.loads, lines) if r["round"] > 0]
    last = rounds[-1] if rounds else {}
    return {
        "scenario": name,
        "set": "faults" if name in SCENARIOS else "security",
        "injected": scenario(name, 1)[0],
        "rounds": len(rounds),
        "failures": sum(r.get("failures", 0) for r in rounds),
        "rejected": sum(r.get("rejected", 0) for r in rounds),
        "reasons": list(dict.fromkeys(rejections.reasons)),
        "error": error,
        "train/loss": [r.get("train/loss") for r in rounds],
        "accuracy_per_round": [r["test/accuracy"] for r in rounds],
        "final_accuracy": last.get("test/accuracy"),
        "final_loss": last.get("test/loss"),
        "wall_seconds": time.perf_counter() - started,
    }


def what_it_did(r: dict) -> str:
    """Rounds completed and aggregated, and the error the run ended with, if any."""
    aggregated = sum(loss is not None for loss in r["train/loss"])
    did = f"completed {r['rounds']} rounds, aggregated {aggregated}"
    if aggregated < r["rounds"]:
        did += f", skipped {r['rounds'] - aggregated} (too few usable updates)"
    if r["error"] is not None:
        words = r["error"].split()
        first = " ".join(words[:10]) + (" ..." if len(words) > 10 else "")
        did += f"; ended with error: {first.replace('|', '/')}"
    return did


def accuracy(value: float | None) -> str:
    """An accuracy to 4 places, or a dash where the run evaluated nothing."""
    return "-" if value is None else f"{value:.4f}"


def faults_table(results: list[dict], command: str) -> str:
    """The faults table, with machine, date and command."""
    lines = [
        f"Measured {date.today().isoformat()} on {machine()} with `{command}`.",
        "",
        "| scenario | injected | what the run did | failures counted | updates rejected "
        "| centralized accuracy per round | final |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_round = ", ".join(f"{a:.4f}" for a in r["accuracy_per_round"]) or "-"
        lines.append(
            f"| {r['scenario']} | {r['injected']} | {what_it_did(r)} | {r['failures']} | "
            f"{r['rejected']} | {per_round} | {accuracy(r['final_accuracy'])} |"
        )
    return "\n".join(lines)


def same_end(r: dict, reference: dict | None) -> str:
    """yes/no: final centralized accuracy and loss equal (to 1e-6) to the reference run's."""
    if reference is None or r is reference:
        return "(reference)" if r is reference else "- (no reference run)"
    pairs = [(r[k], reference[k]) for k in ("final_accuracy", "final_loss")]
    if any(a is None or b is None for a, b in pairs):
        return "no"
    equal = all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in pairs)
    return "yes" if equal else "no"


def security_table(results: list[dict], command: str) -> str:
    """The security table: each attack, what the run did, why it was refused, accuracy."""
    reference = next((r for r in results if r["scenario"] == REFERENCE), None)
    lines = [
        f"Measured {date.today().isoformat()} on {machine()} with `{command}`.",
        "",
        "| attack (client 3, every train reply) | what the run did | updates rejected "
        "| failures | the screen's reason | final centralized accuracy "
        "| equal to the reference run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reason = "; ".join(r["reasons"]).replace("|", "/") or "-"
        lines.append(
            f"| {r['injected']} | {what_it_did(r)} | {r['rejected']} | {r['failures']} | "
            f"{reason} | {accuracy(r['final_accuracy'])} | {same_end(r, reference)} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", choices=[*SETS, "all"], default="faults", dest="which")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*SCENARIOS, *SECURITY],
        metavar="NAME",
        help=f"run these scenarios: {', '.join([*SCENARIOS, *SECURITY])}",
    )
    parser.add_argument("--quick", action="store_true", help="shrunk setup, 2 scenarios a set")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--record", type=Path, help="markdown file to write the tables into")
    args = parser.parse_args()
    if args.quick and args.record:
        parser.error("--quick is a smoke test: its figures are not to be recorded")
    return args


def main() -> None:
    """Parse arguments, run the scenarios, print (and record) the tables."""
    args = parse_args()
    sets = list(SETS) if args.which == "all" else [args.which]
    names = args.only or [n for s in sets for n in SETS[s][: 2 if args.quick else None]]
    setup = QUICK if args.quick else SETUP
    with tempfile.TemporaryDirectory(prefix="fl-faults-") as workdir:
        results = []
        for name in names:
            results.append(run_scenario(name, setup, args.data.resolve(), Path(workdir)))
            r = results[-1]
            print(f"{name}: {r['accuracy_per_round']} ({r['wall_seconds']:.0f} s)", file=sys.stderr)
    chosen = f" --only {' '.join(args.only)}" if args.only else f" --set {args.which}"
    command = f"python benchmarks/faults.py{chosen}{' --quick' * args.quick} --data <data>"
    tables = {
        "faults": faults_table([r for r in results if r["set"] == "faults"], command),
        "security": security_table([r for r in results if r["set"] == "security"], command),
    }
    for block, table in tables.items():
        if any(r["set"] == block for r in results):
            print(table, end="\n\n")
            if args.record:
                record(args.record, block, table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
