"""Wall time of the same config in deployment (`deploy-local`) against simulation (`run`).

    python benchmarks/deployment.py --data ../shared/data --record BENCHMARKS.md

Runs `fl-lightning run CONFIG` and `fl-lightning deploy-local CONFIG` (a TLS SuperLink and
one SuperNode per client, all on this machine) alternately, `--repeats` times, each in a
fresh process, and prints medians of the wall time, the seconds per round and the final
accuracy. Flower's Deployment Engine starts a fresh ClientApp process for every message,
so it also times what such a process pays before it can train: importing the ClientApp
module (what `flwr-clientapp` loads) and then torch and Lightning (the first message).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import machine, record

REPO = Path(__file__).resolve().parents[1]

IMPORTS = {
    "clientapp_module": "import fl_lightning.client_app",
    "clientapp_module_and_training": "import fl_lightning.client_app, fl_lightning.client.training",
}


def run(mode: str, config: str, data: Path, workdir: Path, extra: list[str]) -> dict:
    """One `fl-lightning run|deploy-local` in a fresh process; its wall time and metrics."""
    out = workdir / f"{mode}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "fl_lightning.cli", mode, config, f"data.root={data}"]
    started = time.perf_counter()
    subprocess.run(
        [*command, *extra, f"output.dir={out}"], cwd=REPO, check=True, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["round"] > 0]
    return {
        "wall_seconds": wall,
        "round_seconds": [r["seconds"] for r in rounds],
        "client_training_seconds": [r["time/client_training"] for r in rounds],
        "client_evaluation_seconds": [r.get("time/client_evaluation", 0.0) for r in rounds],
        "final_accuracy": rounds[-1]["test/accuracy"],
    }


def import_seconds(statement: str, repeats: int) -> float:
    """Median wall time of a fresh Python process that runs `statement`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], cwd=REPO, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats."""
    return {
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "seconds_per_round": statistics.median(s for r in runs for s in r["round_seconds"]),
        "client_training_per_round": statistics.median(
            s for r in runs for s in r["client_training_seconds"]
        ),
        "client_evaluation_per_round": statistics.median(
            s for r in runs for s in r["client_evaluation_seconds"]
        ),
        "final_accuracy": statistics.median(r["final_accuracy"] for r in runs),
        "runs": runs,
    }


def markdown(figures: dict, invocation: str) -> str:
    """The comparison as a markdown table."""
    sim, dep = figures["simulation"], figures["deployment"]
    lines = [
        f"Measured {date.today().isoformat()} on {machine()} with "
        f"`python benchmarks/deployment.py {invocation} --data <data>` "
        f"(medians of {figures['repeats']} runs each, alternated).",
        "",
        "| | wall time (s) | s per round | client training per round (s) "
        "| client evaluation per round (s) | final accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in (("simulation (`run`)", sim), ("deployment (`deploy-local`)", dep)):
        lines.append(
            f"| {name} | {f['wall_seconds']:.1f} | {f['seconds_per_round']:.1f} | "
            f"{f['client_training_per_round']:.1f} | {f['client_evaluation_per_round']:.1f} | "
            f"{f['final_accuracy']:.4f} |"
        )
    imports = figures["imports"]
    lines += [
        "",
        f"Deployment / simulation wall time: {figures['ratio']:.2f}. A fresh ClientApp "
        f"process (one per message in deployment) pays "
        f"{imports['clientapp_module']:.2f} s to load the ClientApp module and "
        f"{imports['clientapp_module_and_training']:.2f} s with torch and Lightning "
        f"(median of fresh processes, idle machine).",
    ]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run both modes alternately, print (and record) the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--deploy-args", default="", help="extra deploy-local arguments")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--record", type=Path, help="markdown file to write the table into")
    parser.add_argument("--block", default="deployment")
    args = parser.parse_args()
    data = args.data.resolve()
    imports = {name: import_seconds(stmt, 3) for name, stmt in IMPORTS.items()}
    runs: dict[str, list[dict]] = {"run": [], "deploy-local": []}
    with tempfile.TemporaryDirectory(prefix="fl-deployment-") as workdir:
        for _ in range(args.repeats):
            for mode in runs:
                extra = args.deploy_args.split() if mode == "deploy-local" else []
                runs[mode].append(run(mode, args.config, data, Path(workdir), extra))
                print(f"{mode}: {runs[mode][-1]['wall_seconds']:.1f} s", file=sys.stderr)
    figures = {
        "config": args.config,
        "repeats": args.repeats,
        "simulation": summarize(runs["run"]),
        "deployment": summarize(runs["deploy-local"]),
        "imports": imports,
    }
    figures["ratio"] = figures["deployment"]["wall_seconds"] / figures["simulation"]["wall_seconds"]
    invocation = f"--config {args.config} --repeats {args.repeats}"
    if args.deploy_args:
        invocation += f" --deploy-args '{args.deploy_args}'"
    table = markdown(figures, invocation)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.record:
        record(args.record, args.block, table)


if __name__ == "__main__":
    main()
