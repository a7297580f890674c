"""What DP-SGD costs per round: seconds and the largest client process's memory.

    python benchmarks/dp_sgd_cost.py --data ../shared/data --rounds 1

Runs `configs/mnist_dp_sgd.yaml` (5 clients, Poisson batches of expected size 2048, 3
local epochs) for `--rounds` rounds, one variant after the other in this invocation:

- `whole batches`: one client at a time on both cores, each batch in one piece, Opacus's
  per-sample gradients (the config before #27: `privacy.max_physical_batch_size=null`,
  `num_cpus=2`, `privacy.grad_sample_mode=hooks`);
- `chunks of 256, hooks`: chunks of at most 256 samples and one core per client
  (`federation.client_resources.num_cpus: 1`), so two clients train at a time, with
  Opacus's per-sample gradients (`grad_sample_mode=hooks`);
- `chunks of 64, fast`: the config as shipped, chunks of 64 and `grad_sample_mode: fast`.

The noise is calibrated for the rounds run (fewer rounds, less noise): the arithmetic per
step is the same as in the full recipe. It prints each variant's wall time, seconds per
round and the peak resident memory (RSS) of its largest process (a client's Ray worker),
sampled from /proc every 0.2 s, which costs this process about a third of a core in both.
Accuracy and epsilon of the full recipe: `benchmarks/accuracy.py dp_sgd`.
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

# A sibling script: benchmarks/ is on sys.path when run.
from scale import fl_lightning_run, tree_memory_kb

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/mnist_dp_sgd.yaml"
VARIANTS = {
    "whole batches": [
        "privacy.max_physical_batch_size=null",
        "federation.client_resources.num_cpus=2",
        "privacy.grad_sample_mode=hooks",
    ],
    "chunks of 256, hooks": [
        "privacy.max_physical_batch_size=256",
        "privacy.grad_sample_mode=hooks",
    ],
    "chunks of 64, fast": [],
}


def largest_rss_mb(root: int) -> float:
    """The largest RSS (MiB) among `root` and its descendants."""
    return max((rss for rss, _ in tree_memory_kb(root).values()), default=0) / 1024


def run(overrides: list[str], workdir: Path) -> dict:
    """One watched run: wall seconds, seconds per round, the largest process's peak RSS."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    command = [*fl_lightning_run(CONFIG, overrides), f"output.dir={run_dir}"]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, largest_rss_mb(process.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["round"] > 0]
    return {
        "command": " ".join(["fl-lightning run", CONFIG, *overrides]),
        "wall_seconds": wall,
        "seconds_per_round": sum(r["seconds"] for r in rounds) / len(rounds),
        "largest_process_peak_rss_mb": peak,
        "epsilon": rounds[-1].get("epsilon"),
    }


def main() -> None:
    """Parse arguments, run each variant, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    common = [f"data.root={args.data.resolve()}", f"federation.num_rounds={args.rounds}"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="fl-dp-sgd-cost-") as workdir:
        for name, extra in VARIANTS.items():
            results[name] = run([*common, *extra], Path(workdir))
            print(json.dumps({name: results[name]}), file=sys.stderr)
    base = results["whole batches"]
    lines = [
        f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores, "
        f"CPU only) with `python benchmarks/dp_sgd_cost.py --rounds {args.rounds} "
        "--data <data>`.",
        "",
        "| variant | wall (s) | seconds per round | vs whole batches | largest process peak "
        "RSS (MiB) | vs whole batches |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['wall_seconds']:.0f} | {r['seconds_per_round']:.0f} | "
            f"{r['seconds_per_round'] / base['seconds_per_round']:.2f}x | "
            f"{r['largest_process_peak_rss_mb']:.0f} | "
            f"{r['largest_process_peak_rss_mb'] / base['largest_process_peak_rss_mb']:.2f}x |"
        )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results.values()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
