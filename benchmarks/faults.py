"""Inject client faults and attacks into a federated MNIST run and report what the run did.

    python benchmarks/faults.py --set all --data ../shared/data --record BENCHMARKS.md

10 IID clients (configs/mnist.yaml's recipe, 12,000 training samples, 3 rounds of 1 local
epoch, the full test split). Each scenario runs in this process with the Flower mods of
tests/faults.py and tests/attacks.py (test hooks; no config key turns them on) and reports
the failures and rejected updates counted, the rounds skipped and the final accuracy.

`--set faults` (the default): failing clients and poisoned updates, against FedAvg (with
and without the update screen), Krum and FedMedian.
`--set security`: client 3 attacks, one attack per scenario, and each run is compared with
its reference: the run in which client 3 fails instead (the screen must leave the run
exactly as if that client had failed), or the clean run where the attack only targets
what is logged.
`--quick` shrinks the setup (2,000 samples, 5 clients, 1 round) and runs two scenarios of
each chosen set: a smoke test of the script, never a figure to record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

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
    "unscreened": ("FedAvg without the update screen", ["strategy.update_norm_factor=null"]),
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
FEDADAM = ("strategy.name=fedadam",)
# DP-SGD on this setup: small batches (Opacus keeps per-sample gradients), no Trainer
# clipping (per-sample clipping replaces it), seeded noise so two runs can be compared.
DP_BASE = (
    "privacy.mode=dp_sgd",
    "privacy.reproducible_noise=true",
    "trainer.gradient_clip_val=null",
    "data.batch_size=64",
)
DP_SGD = (*DP_BASE, "privacy.target_epsilon=3.0", "privacy.max_epsilon=3.0")
# A fixed noise multiplier and a budget that fits 3 honest rounds (epsilon 3.68 by RDP) but
# not one round of a client claiming 1 sample (4.73): the review's DP-SGD liar.
DP_FIXED = (*DP_BASE, "privacy.noise_multiplier=1.0", "privacy.max_epsilon=4.0")
DIRICHLET = ("data.partition=dirichlet",)  # sizes the server cannot know: only their sum
# The review's error text: a line, then 3 MB of "Error." on one line.
HUGE_ERROR = "boom\n" + "Error." * 500_000


@dataclass(frozen=True)
class Threat:
    """One security scenario: what client 3 does, and the run it is compared with."""

    what: str
    mods: Callable[[int], list[Mod]]  # the mods, given the run's number of rounds
    overrides: tuple[str, ...] = ()
    reference: str | None = REFERENCE  # None: this run is a reference itself
    watch: str | None = None  # a logged metric (last round) to show beside the reference's


def train_attack(attack: attacks.Attack, *overrides: str, **kw: Any) -> Threat:
    """Client 3 applies `attack` to every train reply."""

    def mods(rounds: int) -> list[Mod]:
        plan = attacks.every_round(attack, range(1, rounds + 1))
        return [attacks.attacking(ATTACKER, plan, {})]

    return Threat("", mods, overrides, **kw)


def fails(partitions: list[int], types: list[str] | None, *overrides: str) -> Threat:
    """A reference: the named clients raise in `types` of messages (None: all, census too)."""
    return Threat("", lambda rounds: [faults.raising(partitions, types)], overrides, None)


def with_what(what: str, threat: Threat) -> Threat:
    return dataclasses.replace(threat, what=what)


TRAIN = [MessageType.TRAIN]
# name -> the threat. Issue #18's attacks on every train reply, compared with client 3
# failing its training; then issue #24's well-formed but hostile clients.
SECURITY: dict[str, Threat] = {
    REFERENCE: with_what("none: client 3 raises in every train message", fails([3], TRAIN)),
    "reference_fedadam": with_what("none, FedAdam", fails([3], TRAIN, *FEDADAM)),
    "reference_dp_sgd": with_what("none, DP-SGD", fails([3], TRAIN, *DP_SGD)),
    "reference_absent": with_what("none: client 3 raises in every message", fails([3], None)),
    "reference_absent_dp_fixed": with_what(
        "none, DP-SGD at a fixed noise", fails([3], None, *DP_FIXED)
    ),
    "reference_absent_dp_fixed_dirichlet": with_what(
        "none, DP-SGD at a fixed noise, Dirichlet split", fails([3], None, *DP_FIXED, *DIRICHLET)
    ),
    "reference_two_absent": with_what(
        "none: clients 0 and 3 raise in every message", fails([0, 3], None)
    ),
    "clean": Threat("none: no attacker", lambda rounds: [], (), None, "update norm spread"),
    "clean_dirichlet": Threat(
        "none: no attacker, Dirichlet split (alpha 0.3)",
        lambda rounds: [],
        ("data.partition=dirichlet", "data.alpha=0.3"),
        None,
        "update norm spread",
    ),
}
_ISSUE_18: dict[str, tuple[str, attacks.Attack]] = {
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
for _name, (_what, _attack) in _ISSUE_18.items():
    SECURITY[_name] = with_what(_what, train_attack(_attack))
SECURITY.update(
    {
        "error_text_3mb": Threat(
            "fails every message (census too) with a 3 MB error text",
            lambda rounds: [attacks.failing_with([ATTACKER], HUGE_ERROR)],
            reference="reference_absent",
            watch="client text seconds",
        ),
        "weights_1e30": with_what("every weight 1e30", train_attack(attacks.weights(1e30))),
        "weights_1e8": with_what("every weight 1e8", train_attack(attacks.weights(1e8))),
        "weights_1e30_fedadam": with_what(
            "every weight 1e30, FedAdam",
            train_attack(attacks.weights(1e30), *FEDADAM, reference="reference_fedadam"),
        ),
        "weights_1e8_fedadam": with_what(
            "every weight 1e8, FedAdam",
            train_attack(attacks.weights(1e8), *FEDADAM, reference="reference_fedadam"),
        ),
        "census_hijack": Threat(
            "answers the census as partition 0 (client 0's)",
            lambda rounds: [attacks.attacking(ATTACKER, {}, {}, attacks.census_claim(partition=0))],
            reference="reference_two_absent",
        ),
        "census_size": Threat(
            "claims 5x its training samples in the census",
            lambda rounds: [attacks.attacking(ATTACKER, {}, {}, attacks.census_claim(train=5400))],
            reference="reference_absent",
        ),
        "train_loss_1e308": with_what(
            "`train/loss` 1.7e308 in every train reply",
            train_attack(
                attacks.metric("train/loss", 1.7e308), reference="clean", watch="train/loss"
            ),
        ),
        "val_accuracy_1": Threat(
            "`val/accuracy` 1.0 in every evaluate reply",
            lambda rounds: [
                attacks.attacking(
                    ATTACKER,
                    {},
                    attacks.every_round(attacks.metric("val/accuracy", 1.0), range(1, rounds + 1)),
                )
            ],
            reference="clean",
            watch="val/accuracy",
        ),
        "dp_epsilon_1e300": with_what(
            "DP-SGD: `privacy/epsilon` 1e300 in every train reply",
            train_attack(
                attacks.metric("privacy/epsilon", 1e300),
                *DP_SGD,
                reference="reference_dp_sgd",
                watch="epsilon",
            ),
        ),
        "dp_census_1_sample": Threat(
            "DP-SGD at a fixed noise: claims 1 training sample in the census",
            lambda rounds: [attacks.attacking(ATTACKER, {}, {}, attacks.census_claim(train=1))],
            DP_FIXED,
            reference="reference_absent_dp_fixed",
            watch="epsilon",
        ),
        "dp_census_1_sample_dirichlet": Threat(
            "the same, Dirichlet split",
            lambda rounds: [attacks.attacking(ATTACKER, {}, {}, attacks.census_claim(train=1))],
            (*DP_FIXED, *DIRICHLET),
            reference="reference_absent_dp_fixed_dirichlet",
            watch="epsilon",
        ),
    }
)
SETS = {"faults": list(SCENARIOS), "security": list(SECURITY)}


def scenario(name: str, rounds: int) -> tuple[str, list[str], list[Mod]]:
    """What scenario `name` injects, its overrides and its mods (in a run of `rounds`)."""
    if name in SCENARIOS:
        return SCENARIOS[name]
    threat = SECURITY[name]
    return threat.what, list(threat.overrides), threat.mods(rounds)


class Rejections(logging.Handler):
    """Collects the reasons the reply screen logs for the replies it rejects."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the reason of a rejection warning (or of a census conflict), drop the rest."""
        message = record.getMessage().removesuffix(" (repeats are counted, not shown)")
        _, rejected, reason = message.partition(" rejected: ")
        if rejected:
            self.reasons.append(reason)
        elif (
            message.startswith(("census conflict: ", "a client failed")) or " skipped: " in message
        ):
            self.reasons.append(message)  # a conflict, a failure, or a round not adopted


class ServerWatch:
    """What the server does with what clients send, measured in this (the server's) process:
    the seconds spent on failed clients' text, and each round's update-norm spread (the
    largest update norm over the median: how far the update screen's bar is from honest)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.spreads: list[float] = []

    def __enter__(self) -> ServerWatch:
        from fl_lightning.server import census, checks, reply_screen, round_screen

        self._saved: list[tuple[Any, str, Any]] = [
            (census, "error_summary", census.error_summary),
            (reply_screen, "error_summary", reply_screen.error_summary),
            (checks.Notices, "say", checks.Notices.say),
            (round_screen, "norm_problems", round_screen.norm_problems),
        ]
        for owner, name, function in self._saved[:3]:
            setattr(owner, name, self._timed(function))
        round_screen.norm_problems = self._spread(round_screen.norm_problems)  # type: ignore[assignment]
        return self

    def _timed(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return run

    def _spread(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(norms: list[float], *args: Any) -> Any:
            median = statistics.median(norms) if norms else 0.0
            if median > 0:
                self.spreads.append(max(norms) / median)
            return function(norms, *args)

        return run

    def __exit__(self, *exc: object) -> None:
        for owner, name, function in self._saved:
            setattr(owner, name, function)


def simulate(name: str, setup: list[str], data: Path, workdir: Path) -> tuple[Path, str | None]:
    """Run scenario `name`; its metrics.jsonl and the one-line error it ended with, if any."""
    from flwr.simulation import run_simulation

    from fl_lightning.client_app import make_client_app
    from fl_lightning.config.load import load_config
    from fl_lightning.errors import FlLightningError
    from fl_lightning.run.simulation import backend_config
    from fl_lightning.server.rundir import create_run_dir
    from fl_lightning.server_app import make_server_app

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
    except FlLightningError as err:  # the product's own end, one line (NothingTrained...)
        return run.metrics, " ".join(str(err).split())
    return run.metrics, None


def run_scenario(name: str, setup: list[str], data: Path, workdir: Path) -> dict:
    """One federated run with the scenario's faults; what it counted and reached."""
    from fl_lightning.run.simulation import _drop_client_tracebacks

    rejections = Rejections()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(rejections)
    flwr_logger.addFilter(_drop_client_tracebacks)  # as `fl-lightning run` does
    started = time.perf_counter()
    try:
        with ServerWatch() as watch_server:
            metrics, error = simulate(name, setup, data, workdir)
    finally:
        flwr_logger.removeHandler(rejections)
        flwr_logger.removeFilter(_drop_client_tracebacks)
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rounds = [r for r in map(json.loads, lines) if r["round"] > 0]
    last = rounds[-1] if rounds else {}
    threat = SECURITY.get(name)
    watch = threat.watch if threat is not None else None
    return {
        "reference": threat.reference if threat is not None else None,
        "watch": watch,
        "watched": {
            "client text seconds": watch_server.seconds,
            "update norm spread": max(watch_server.spreads, default=None),
        }.get(watch or "", last.get(watch or "")),
        "skipped": sum(r.get("skipped", 0) for r in rounds),
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
        "last_metrics": last,
        "wall_seconds": time.perf_counter() - started,
    }


def what_it_did(r: dict) -> str:
    """Rounds completed and aggregated, and the error the run ended with, if any."""
    aggregated = sum(loss is not None for loss in r["train/loss"])
    did = f"completed {r['rounds']} rounds, aggregated {aggregated}"
    if aggregated < r["rounds"]:
        did += f", skipped {r['rounds'] - aggregated}"
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
    """How the run ended against the run it is compared with: equal (to 1e-6), or by how much
    its final centralized accuracy differs."""
    if reference is None:
        return "(reference)" if r["reference"] is None else "- (reference not run)"
    pairs = [(r[k], reference[k]) for k in ("final_accuracy", "final_loss")]
    if any(a is None or b is None for a, b in pairs):
        return "no final model"
    if all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in pairs):
        return "equal"
    return f"{r['final_accuracy'] - reference['final_accuracy']:+.4f}"


def watched(r: dict, reference: dict | None) -> str:
    """The figure a scenario watches (a logged metric, the server's time on client text)."""
    if r["watch"] is None:
        return "-"
    value = r["watched"]
    shown = "-" if value is None else f"{value:.4g}"
    if r["watch"] == "client text seconds" and reference is not None:
        shown += (
            f" (the run: {r['wall_seconds']:.0f} s, reference {reference['wall_seconds']:.0f} s)"
        )
    if reference is not None and r["watch"] != "client text seconds":
        theirs = reference["watched"] if reference["watch"] == r["watch"] else None
        if theirs is None:
            theirs = reference.get("last_metrics", {}).get(r["watch"])
        shown += f" (reference {'-' if theirs is None else f'{theirs:.4g}'})"
    return f"{r['watch']}: {shown}"


def security_table(results: list[dict], command: str) -> str:
    """The security table: each attack, what the run did, why it was refused, accuracy."""
    by_name = {r["scenario"]: r for r in results}
    lines = [
        f"Measured {date.today().isoformat()} on {machine()} with `{command}`.",
        "",
        "| attack (client 3) | what the run did | rejected | failures | what the server said "
        "| final accuracy | compared with | against it | watched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reasons = r["reasons"]
        reason = (reasons[0] if reasons else "-").replace("|", "/")
        if len(reasons) > 1:
            reason += f" (and {len(reasons) - 1} more)"
        reference = by_name.get(r["reference"]) if r["reference"] else None
        lines.append(
            f"| {r['injected']} | {what_it_did(r)} | {r['rejected']} | {r['failures']} | "
            f"{reason} | {accuracy(r['final_accuracy'])} | {r['reference'] or '-'} | "
            f"{same_end(r, reference)} | {watched(r, reference)} |"
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
