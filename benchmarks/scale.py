"""Seconds per round and peak memory as the federation grows: 10, 100, 1000 clients.

    python benchmarks/scale.py --data ../shared/data --record BENCHMARKS.md

Runs configs/mnist.yaml with N clients for N in --clients, min(N, --sampled) of them (10
by default) sampled per round for training and as many for evaluation, every client
holding the same 60 samples' worth of data (data.max_train_samples = 60 N), so with a
fixed number sampled each round does the same work whatever N is: what grows with N is
only what the product does per client in total. Prints the mean seconds per round (after
the first round, which starts the client processes; the last round included, as it waits
for the evaluations still running in the background) and the peak memory summed over
every process of the run (driver, Ray's GCS and raylet, Ray workers), as RSS (shared
library pages counted once per process) and PSS (shared pages split between the processes
sharing them), sampled from /proc every 0.2 s (Linux) in a second run of each size, so
that the timed run goes untouched.

`--stateful` runs each size twice with Adam, without and with `federation.stateful_clients`
(whose optimizer states are kept on disk, not in memory), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_CLIENT = 60


def process_children() -> dict[int, list[int]]:
    """Each live process id -> the ids of its children (from /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_memory_kb(root: int) -> dict[int, tuple[int, int]]:
    """(RSS, PSS) in KiB of `root` and of each of its descendants, by process id."""
    tree, stack, memory = process_children(), [root], {}
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        try:
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                if line.startswith(("Rss:", "Pss:"))
            )
        except OSError:
            continue
        memory[pid] = (int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0]))
    return memory


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(RSS, PSS) of `root` and all its descendants, summed, in MiB.

    RSS counts a page shared by several processes (torch's libraries, mapped by every
    worker) once per process; PSS splits it between them, so its sum is what the
    processes occupy together.
    """
    memory = tree_memory_kb(root).values()
    return sum(rss for rss, _ in memory) / 1024, sum(pss for _, pss in memory) / 1024


def fl_lightning_run(config: str, overrides: list[str]) -> list[str]:
    """`fl-lightning run CONFIG OVERRIDES...` with this interpreter."""
    return [sys.executable, "-m", "fl_lightning.cli", "run", config, *overrides]


def run_timed(command: list[str]) -> float:
    """Run `command` from the repository, untouched; return its wall seconds."""
    started = time.perf_counter()
    returncode = subprocess.call(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {returncode}")
    return time.perf_counter() - started


def run_watched(command: list[str]) -> tuple[float, float]:
    """Run `command` from the repository; return its peak summed RSS and PSS (MiB).

    Sampling every process's smaps_rollup five times a second costs this process about
    a third of a core, which would slow the run down: time runs with `run_timed`.
    """
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    peak_rss = peak_pss = 0.0
    while process.poll() is None:
        rss, pss = tree_memory_mb(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return peak_rss, peak_pss


def run(
    clients: int, sampled: int, rounds: int, data: Path, workdir: Path, extra: tuple[str, ...] = ()
) -> dict:
    """One run with `clients` clients, `sampled` (at most) per round, and `extra` overrides;
    its seconds per round and peak summed RSS."""
    run_dir = workdir / f"clients-{clients}{'-'.join(('', *extra)).replace('=', '_')}"
    fraction = min(sampled, clients) / clients
    overrides = [
        f"data.root={data}",
        f"data.max_train_samples={SAMPLES_PER_CLIENT * clients}",
        f"federation.num_clients={clients}",
        f"federation.num_rounds={rounds}",
        f"federation.fraction_train={fraction}",
        f"federation.fraction_evaluate={fraction}",
        "trainer.max_epochs=1",
        *extra,
    ]
    command = fl_lightning_run("configs/mnist.yaml", overrides)
    # The same run twice: timed untouched, then watched for memory.
    wall = run_timed([*command, f"output.dir={run_dir}"])
    peak_rss, peak_pss = run_watched([*command, f"output.dir={run_dir}-memory"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records if r["round"] > 0]
    return {
        "clients": clients,
        "variant": " ".join(extra) or "-",
        "sampled": min(sampled, clients),
        "command": " ".join(["fl-lightning run configs/mnist.yaml", *overrides]),
        "rounds": rounds,
        "wall_seconds": wall,
        "round_seconds": seconds,
        # The mean after round 1 (which starts the workers), the last round included: it
        # also waits for the rounds still being evaluated in the background.
        "seconds_per_round": statistics.mean(seconds[1:] or seconds),
        "peak_rss_mb": peak_rss,
        "peak_pss_mb": peak_pss,
    }


def markdown(results: list[dict], invocation: str) -> str:
    """The table, each row relative to the smallest federation too."""
    base = results[0]
    lines = [
        f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores, "
        f"CPU only) with `python benchmarks/scale.py {invocation}`.",
        "",
        "| clients | variant | sampled | seconds per round | vs first | peak summed RSS (MiB) "
        "| vs first | peak summed PSS (MiB) | vs first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['clients']} | {r['variant']} | {r['sampled']} | {r['seconds_per_round']:.2f} | "
            f"{r['seconds_per_round'] / base['seconds_per_round']:.2f}x | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | "
            f"{r['peak_pss_mb']:.0f} | {r['peak_pss_mb'] / base['peak_pss_mb']:.2f}x |"
        )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run each federation size, print (and record) the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10, help="clients per round, at most")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--record", type=Path, help="markdown file to write the table into")
    parser.add_argument(
        "--stateful", action="store_true", help="Adam without and with stateful clients"
    )
    args = parser.parse_args()
    variants: list[tuple[str, ...]] = [()]
    if args.stateful:
        adam = "optimizer.name=adam"
        variants = [(adam,), (adam, "federation.stateful_clients=true")]
    with tempfile.TemporaryDirectory(prefix="fl-scale-") as workdir:
        results = []
        for clients in args.clients:
            for extra in variants:
                data = args.data.resolve()
                results.append(run(clients, args.sampled, args.rounds, data, Path(workdir), extra))
                print(json.dumps(results[-1]), file=sys.stderr)
    clients = " ".join(str(c) for c in args.clients)
    invocation = f"--clients {clients} --sampled {args.sampled} --rounds {args.rounds}"
    invocation += " --stateful" if args.stateful else ""
    table = markdown(results, f"{invocation} --data <data>")
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.record:
        from accuracy import record

        record(args.record, "scale", table)


if __name__ == "__main__":
    main()
