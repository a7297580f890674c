"""Run named federated experiments and print (optionally record) their centralized accuracy.

    python benchmarks/accuracy.py mnist cifar10 --data ../shared/data --record BENCHMARKS.md

Each experiment is `fl-lightning run <config> <overrides>` in a fresh run directory; the
figures come from that run's metrics.jsonl. With --record, the markdown table replaces
the block between `<!-- accuracy:begin -->` and `<!-- accuracy:end -->` in the file.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (config, overrides, data sub-folder)
EXPERIMENTS: dict[str, tuple[str, list[str], str]] = {
    "mnist": ("configs/mnist.yaml", [], ""),
    "cifar10": ("configs/cifar10.yaml", [], "cifar10"),
}


def run_experiment(name: str, data: Path, workdir: Path) -> dict:
    """Run one experiment and return its rounds, wall time and accuracies."""
    config, overrides, sub = EXPERIMENTS[name]
    run_dir = workdir / name
    command = [
        sys.executable,
        "-m",
        "fl_lightning.cli",
        "run",
        config,
        f"data.root={data / sub}",
        *overrides,
        f"output.dir={run_dir}",
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["centralized_accuracy"] for r in records if r["round"] > 0]
    return {
        "experiment": name,
        "command": " ".join(["fl-lightning", "run", config, f"data.root={data / sub}", *overrides]),
        "rounds": len(accuracy),
        "wall_seconds": wall,
        "accuracy_per_round": accuracy,
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
    }


def markdown(results: list[dict]) -> str:
    """A table of the results, with the machine and date they were measured on."""
    lines = [
        f"Measured {date.today().isoformat()} on {platform.machine()} "
        f"({_cores()} cores, CPU only), `python benchmarks/accuracy.py "
        f"{' '.join(r['experiment'] for r in results)} --data <data>`.",
        "",
        "| experiment | rounds | wall time (s) | centralized accuracy per round | final | best |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        per_round = ", ".join(f"{a:.4f}" for a in r["accuracy_per_round"])
        lines.append(
            f"| {r['experiment']} | {r['rounds']} | {r['wall_seconds']:.0f} | {per_round} | "
            f"{r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} |"
        )
    return "\n".join(lines)


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def record(path: Path, table: str) -> None:
    """Replace the accuracy block of `path` with `table`."""
    begin, end = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
    text = path.read_text()
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main() -> None:
    """Parse arguments, run the experiments, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--record", type=Path, help="markdown file whose accuracy block is replaced"
    )
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-accuracy-") as workdir:
        results = [
            run_experiment(name, args.data.resolve(), Path(workdir)) for name in args.experiments
        ]
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.record:
        record(args.record, table)


if __name__ == "__main__":
    main()
