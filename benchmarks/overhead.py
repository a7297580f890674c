"""What federation costs: `fl-lightning run` against a plain PyTorch loop doing the same work.

    python benchmarks/overhead.py --data ../shared/data --repeats 3 --record BENCHMARKS.md

For each setup (MNIST: the seed's 5 clients x 2 rounds x 2 local epochs; CIFAR-10: the
same with 1 round of 1 epoch), runs, alternately and `--repeats` times each, in fresh
processes:

(a) `fl-lightning run configs/<setup>_seed_recipe.yaml` (AdamW lr 1e-3, weight decay 1e-4,
    batch 32, gradient clipping 1.0), and
(b) a plain single-process PyTorch loop: the same network (Table I/II), the same training
    samples (every client's partition, decoded the same way), batch size, optimizer,
    clipping and number of passes over the samples, one test pass per round.

It prints the medians of both wall times, their ratio (`ratio_total`, start-up included),
the peak resident memory of the federated run summed over its processes (in one more
run: sampling /proc would slow a timed one), the ratio of
the rounds alone (`ratio_rounds`: federated round seconds / the plain loop's
training and test seconds), and the federated run's breakdown, whose columns add up to
its wall time: start-up (interpreter, imports, Ray, the server's data load, up to round
1), client training (as the server waits for it: messaging, Lightning, training, and in
round 1 the Ray workers' own start), aggregation, client evaluation, centralized
evaluation of the last round, the last round's wait for the earlier rounds' evaluations
(`time/evaluation_backlog`), checkpoints, logging (from the last round's record to
summary.md: TensorBoard, the resume state, curves.png), shutdown (Flower's and Ray's
teardown, the exit), and apart, the centralized evaluations that ran in the background
while the next round trained (their records too).
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

# A sibling script: benchmarks/ is on sys.path when run.
from scale import fl_lightning_run, run_timed, run_watched

REPO = Path(__file__).resolve().parents[1]
SETUPS = {
    "mnist": ("configs/mnist_seed_recipe.yaml", [], ""),
    "cifar10": (
        "configs/cifar10_seed_recipe.yaml",
        ["federation.num_rounds=1", "trainer.max_epochs=1"],
        "cifar10",
    ),
}
PHASES = (
    "client_training",
    "aggregation",
    "client_evaluation",
    "centralized_evaluation",
    "evaluation_backlog",
    "checkpoint",
    "between",
)
# The breakdown's columns, in order: (key in --json's "breakdown", table header).
BREAKDOWN = (
    ("startup", "start-up"),
    ("client_training", "client training"),
    ("aggregation", "aggregation"),
    ("client_evaluation", "client evaluation"),
    ("centralized_evaluation", "centralized evaluation"),
    ("evaluation_backlog", "waiting for background evaluations"),
    ("checkpoint", "checkpoints"),
    ("between", "other"),
    ("logging", "logging"),
    ("shutdown", "shutdown"),
    ("background_evaluation", "centralized evaluation in the background (overlapping the above)"),
)


def plain_loop(config: str, overrides: list[str]) -> dict[str, float]:
    """Train the config's network on every client's samples in one process; time it."""
    started = time.perf_counter()
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from fl_lightning.config.load import load_config
    from fl_lightning.data.datasets import IndexedImages, collate_batch, load_splits
    from fl_lightning.data.partition import client_splits
    from fl_lightning.models.build import build_model

    cfg = load_config(REPO / config, overrides)
    torch.manual_seed(cfg.seed)
    data = load_splits(cfg.data)  # decoded the same way, once
    partitions = client_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    train = torch.cat([indices for indices, _ in partitions])
    batch = cfg.data.batch_size

    def images(split: str, indices: torch.Tensor) -> IndexedImages:
        return IndexedImages(getattr(data, split), indices, data.mean, data.std)

    loader = DataLoader(
        images("train", train), batch_size=batch, shuffle=True, collate_fn=collate_batch
    )
    test = DataLoader(
        images("test", torch.arange(len(data.test))),
        batch_size=cfg.data.eval_batch_size,  # as the federated run's evaluation
        collate_fn=collate_batch,
    )
    net = build_model(cfg, data.num_classes).net  # the bare nn.Module
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    ready = time.perf_counter()
    for _ in range(cfg.federation.num_rounds):
        net.train()
        for _ in range(cfg.trainer.max_epochs):
            for images, labels in loader:
                optimizer.zero_grad()
                F.cross_entropy(net(images), labels).backward()
                if cfg.trainer.gradient_clip_val:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.trainer.gradient_clip_val)
                optimizer.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test:
                correct += int((net(images).argmax(1) == labels).sum())
        accuracy = correct / len(test.dataset)  # type: ignore[arg-type]
    done = time.perf_counter()
    return {
        "startup_seconds": ready - started,
        "loop_seconds": done - ready,
        "samples": len(train),
        "accuracy": accuracy,
    }


def run_plain(config: str, overrides: list[str]) -> dict[str, float]:
    """(b) in a fresh interpreter, so imports and data loading count as they do for (a)."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--plain", config, *overrides],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    figures["wall_seconds"] = time.perf_counter() - started
    return figures


def run_federated(config: str, overrides: list[str], workdir: Path) -> dict[str, float]:
    """(a): `fl-lightning run` in a fresh process; wall time and the run's own breakdown."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    launched = time.time()
    wall = run_timed([*fl_lightning_run(config, overrides), f"output.dir={run_dir}"])
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = [r for r in records if r["round"] > 0]
    round_seconds = sum(r["seconds"] for r in rounds)
    # Rounds 1..N follow each other on the critical path and the last one's record is the
    # file's last write (the closes in the background are waited for first): round 1
    # began round_seconds before metrics.jsonl was last modified. summary.md is the run's
    # last output; what follows is Flower's and Ray's teardown.
    last_record, summary = metrics.stat().st_mtime, (run_dir / "summary.md").stat().st_mtime
    figures = {
        "wall_seconds": wall,
        "round_seconds": round_seconds,
        "startup": last_record - round_seconds - launched,
        "logging": summary - last_record,
        "shutdown": launched + wall - summary,
        "accuracy": rounds[-1]["test/accuracy"],
    }
    for phase in PHASES:
        figures[phase] = sum(r.get(f"time/{phase}", 0.0) for r in records)
    # Every round but the last is evaluated in the background while the next one trains
    # (fl_lightning.server.round_close): those seconds overlap the others, so they are
    # counted apart.
    last = max(r["round"] for r in records)
    background = [r.get("time/centralized_evaluation", 0.0) for r in records if r["round"] < last]
    figures["centralized_evaluation"] -= sum(background)
    figures["background_evaluation"] = sum(background)
    return figures


def measure(setup: str, data: Path, repeats: int, workdir: Path) -> dict:
    """Alternate (a) and (b) `repeats` times; medians of each figure."""
    config, overrides, sub = SETUPS[setup]
    overrides = [f"data.root={data / sub}", *overrides]
    federated, plain = [], []
    for i in range(repeats):
        federated.append(run_federated(config, overrides, workdir))
        plain.append(run_plain(config, overrides))
        print(f"{setup} {i + 1}/{repeats}: {federated[-1]} {plain[-1]}", file=sys.stderr)
    # Memory in a run of its own: the sampling would slow a timed run (see run_watched).
    peak_rss, peak_pss = run_watched(
        [*fl_lightning_run(config, overrides), f"output.dir={workdir / f'memory-{setup}'}"]
    )

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    fed_wall, plain_wall = median(federated, "wall_seconds"), median(plain, "wall_seconds")
    fed_rounds, plain_loop_s = median(federated, "round_seconds"), median(plain, "loop_seconds")
    return {
        "setup": setup,
        "command": " ".join(["fl-lightning run", config, *overrides]),
        "federated_seconds": fed_wall,
        "plain_seconds": plain_wall,
        "ratio_total": fed_wall / plain_wall,
        "ratio_rounds": fed_rounds / plain_loop_s,
        "federated_round_seconds": fed_rounds,
        "plain_loop_seconds": plain_loop_s,
        "plain_startup_seconds": median(plain, "startup_seconds"),
        "breakdown": {key: median(federated, key) for key, _ in BREAKDOWN},
        "federated_peak_rss_mb": peak_rss,
        "federated_peak_pss_mb": peak_pss,
        "federated_accuracy": median(federated, "accuracy"),
        "plain_accuracy": median(plain, "accuracy"),
        "samples_per_pass": plain[0]["samples"],
        "repeats": repeats,
    }


def markdown(results: list[dict], invocation: str) -> str:
    """One table of wall times and ratios, one of the federated breakdown."""
    lines = [
        f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores, "
        f"CPU only) with `python benchmarks/overhead.py {invocation}`; medians of "
        f"{results[0]['repeats']} alternating runs each.",
        "",
        "| setup | federated (s) | plain (s) | ratio_total | federated rounds (s) "
        "| plain loop (s) | ratio_rounds | accuracy federated / plain "
        "| peak summed RSS / PSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setup']} | {r['federated_seconds']:.1f} | {r['plain_seconds']:.1f} | "
            f"{r['ratio_total']:.3f} | {r['federated_round_seconds']:.1f} | "
            f"{r['plain_loop_seconds']:.1f} | {r['ratio_rounds']:.3f} | "
            f"{r['federated_accuracy']:.4f} / {r['plain_accuracy']:.4f} | "
            f"{r['federated_peak_rss_mb']:.0f} / {r['federated_peak_pss_mb']:.0f} |"
        )
    lines += [
        "",
        "Where the federated run's seconds go (medians):",
        "",
        "| setup | " + " | ".join(header for _, header in BREAKDOWN) + " |",
        "|---|" + "---|" * len(BREAKDOWN),
    ]
    for r in results:
        cells = (f"{r['breakdown'][key]:.1f}" for key, _ in BREAKDOWN)
        lines.append(f"| {r['setup']} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (a):", ""] + [f"- `{r['command']}`" for r in results]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run the setups, or (internally) just the plain loop."""
    if len(sys.argv) > 2 and sys.argv[1] == "--plain":
        print(json.dumps(plain_loop(sys.argv[2], sys.argv[3:])))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--record", type=Path, help="markdown file to write the table into")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-overhead-") as workdir:
        results = [
            measure(setup, args.data.resolve(), args.repeats, Path(workdir))
            for setup in args.setups
        ]
    invocation = " ".join([*args.setups, f"--repeats {args.repeats}", "--data <data>"])
    table = markdown(results, invocation)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.record:
        from accuracy import record

        record(args.record, "overhead", table)


if __name__ == "__main__":
    main()
