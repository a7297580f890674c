"""Cross-device rounds: many small clients, against a plain PyTorch loop doing the same work.

    python benchmarks/cross_device.py --data ../shared/data --sampled 10 50 100 --every 1 10

The setup: MNIST (the seed recipe, `configs/mnist_seed_recipe.yaml`: MNISTNet, AdamW,
clipping 1.0) cut into 1000 clients of 60 training samples (no validation hold-out), S of
them sampled per round, 1 local epoch of batch 10 (6 optimizer steps each), the server
testing the global model every k rounds and at the last (`--every`: each k given). For
each k and S it runs, one after the other:

(a) `fl-lightning run` with those overrides, and
(b) a plain loop on the same 2 cores: two processes, each taking half of the round's S
    clients in turn (the global weights loaded, a fresh AdamW, the same 6 clipped steps on
    that client's 60 samples), one of them testing on the same test samples in the same
    rounds. No messages, no Lightning, no aggregation.

It prints seconds per round of both (medians over the rounds after the first, which starts
the federation's workers), their ratio, and where the federated round's seconds go, from
the run's own `time/*` record: client training as the server waits for it (dispatch, the
clients' set-up and `fit`, their replies), aggregation, centralized evaluation,
checkpoints and the rest (`between`: logging and the strategy's bookkeeping).
`--json PATH` writes one object per (k, S) with `every`, `sampled`,
`federated_seconds_per_round`, `plain_seconds_per_round`, `ratio` and the breakdown.
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
from typing import Any

# A sibling script: benchmarks/ is on sys.path when run.
from scale import fl_lightning_run, run_timed

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/mnist_seed_recipe.yaml"
CLIENTS, SAMPLES = 1000, 60
WORKERS = 2  # the Simulation Engine's workers on this machine: one per core
# The round record's keys: the server's phases (`time/<phase>`), and the clients' mean
# set-up and `fit` seconds (`time/clients/*`, what their train replies say).
PHASES = {
    "client_training": "time/client_training",
    "client_setup": "time/clients/setup",
    "client_fit": "time/clients/fit",
    "aggregation": "time/aggregation",
    "centralized_evaluation": "time/centralized_evaluation",
    "checkpoint": "time/checkpoint",
    "between": "time/between",
}


def overrides(data: Path, sampled: int, rounds: int, every: int, extra: list[str]) -> list[str]:
    """The cross-device setup as `fl-lightning run` overrides."""
    return [
        f"data.root={data}",
        f"federation.num_clients={CLIENTS}",
        f"data.max_train_samples={CLIENTS * SAMPLES}",
        "data.val_fraction=0",
        "data.batch_size=10",
        "trainer.max_epochs=1",
        f"federation.num_rounds={rounds}",
        f"federation.fraction_train={sampled / CLIENTS}",
        f"evaluation.every_n_rounds={every}",
        *extra,
    ]


def plain_worker(worker: int, config_overrides: list[str], sampled: int) -> dict[str, Any]:
    """(b), one of its processes: its share of each round's clients; seconds per round."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from fl_lightning.config.load import load_config
    from fl_lightning.config.schema import centrally_evaluated
    from fl_lightning.data.datamodule import FederatedDataModule
    from fl_lightning.data.datasets import IndexedImages, collate_batch, load_splits
    from fl_lightning.data.loaders import test_subset
    from fl_lightning.data.partition import client_splits
    from fl_lightning.models.build import build_model

    torch.set_num_threads(1)  # one core each, as a simulation worker with one CPU
    cfg = load_config(REPO / CONFIG, config_overrides)
    torch.manual_seed(cfg.seed)
    data = load_splits(cfg.data)
    partitions = client_splits(cfg.data, CLIENTS, cfg.seed)

    def loader(indices: Any) -> DataLoader:
        images = IndexedImages(data.train, indices, data.mean, data.std)
        return DataLoader(
            images, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=collate_batch
        )

    test = FederatedDataModule(cfg.data, cfg.seed).test_dataloader()
    test = test_subset(test, cfg.evaluation.max_samples, cfg.seed)  # the server's samples
    net = build_model(cfg, data.num_classes).net
    start = {k: v.clone() for k, v in net.state_dict().items()}
    o, rounds, seconds = cfg.optimizer, cfg.federation.num_rounds, []
    for server_round in range(1, rounds + 1):
        began = time.perf_counter()
        for slot in range(worker, sampled, WORKERS):
            client = ((server_round - 1) * sampled + slot) % CLIENTS
            net.load_state_dict(start)
            net.train()
            optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
            for images, labels in loader(partitions[client][0]):
                optimizer.zero_grad()
                F.cross_entropy(net(images), labels).backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.trainer.gradient_clip_val)
                optimizer.step()
        if worker == 0 and centrally_evaluated(cfg, server_round):
            net.eval()
            with torch.no_grad():
                for images, labels in test:
                    logits = net(images)
                    F.cross_entropy(logits, labels)
                    (logits.argmax(1) == labels).float().mean()
        seconds.append(time.perf_counter() - began)
    return {"round_seconds": seconds}


def run_plain(config_overrides: list[str], sampled: int) -> list[float]:
    """(b): both processes at once; each round as long as the slower of the two."""
    command = [sys.executable, __file__, "--plain-worker"]
    processes = [
        subprocess.Popen(
            [*command, str(w), str(sampled), *config_overrides],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for w in range(WORKERS)
    ]
    outputs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
        raise SystemExit("the plain loop failed")
    per_worker = [json.loads(out.strip().splitlines()[-1])["round_seconds"] for out in outputs]
    return [max(r) for r in zip(*per_worker, strict=True)]


def run_federated(config_overrides: list[str], workdir: Path) -> dict[str, Any]:
    """(a): `fl-lightning run`; each round's seconds and its `time/*` phases."""
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    launched = time.time()
    wall = run_timed([*fl_lightning_run(CONFIG, config_overrides), f"output.dir={run_dir}"])
    metrics = run_dir / "metrics.jsonl"
    rounds = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["round"] > 0]
    # As benchmarks/overhead.py: rounds 1..N follow each other and the last record is the
    # file's last write, so round 1 began their seconds before it; its first clients start
    # fitting once set up. After the last record: summary.md, curves and the teardown.
    last_record = metrics.stat().st_mtime
    round_one = last_record - sum(r["seconds"] for r in rounds)
    return {
        "wall_seconds": wall,
        "first_fit_seconds": round_one - launched + rounds[0].get(PHASES["client_setup"], 0.0),
        "exit_seconds": launched + wall - last_record,
        "round_seconds": [r["seconds"] for r in rounds],
        "phases": {p: [r.get(key, 0.0) for r in rounds] for p, key in PHASES.items()},
    }


def measure(
    sampled: int, data: Path, rounds: int, every: int, extra: list[str], workdir: Path
) -> dict:
    """(a) then (b) for S = `sampled`; medians over rounds 2..N."""
    config_overrides = overrides(data, sampled, rounds, every, extra)
    federated = run_federated(config_overrides, workdir)
    plain = run_plain(config_overrides, sampled)
    fed = statistics.median(federated["round_seconds"][1:])
    bare = statistics.median(plain[1:])
    return {
        "every": every,
        "sampled": sampled,
        "command": " ".join(["fl-lightning run", CONFIG, *config_overrides]),
        "federated_seconds_per_round": fed,
        "plain_seconds_per_round": bare,
        "ratio": fed / bare,
        "federated_wall_seconds": federated["wall_seconds"],
        "first_fit_seconds": federated["first_fit_seconds"],
        "exit_seconds": federated["exit_seconds"],
        "breakdown": breakdown(federated["phases"], sampled),
    }


def breakdown(phases: dict[str, list[float]], sampled: int) -> dict[str, float]:
    """Medians of each phase over rounds 2..N, and what client training leaves to the
    messages: the server's wait minus the clients' own work spread over the workers."""
    median = {p: statistics.median(v[1:]) for p, v in phases.items()}
    work = sampled * (median["client_setup"] + median["client_fit"]) / WORKERS
    return {**median, "dispatch": median["client_training"] - work}


def markdown(results: list[dict], invocation: str) -> str:
    """The ratio table and the federated round's breakdown."""
    lines = [
        f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores, "
        f"CPU only) with `python benchmarks/cross_device.py {invocation}`; medians over "
        "rounds 2 to N; client set-up and fit are per client, the rest per round.",
        "",
        "| evaluated every | sampled | federated (s/round) | plain (s/round) | ratio "
        "| client training (s) | client set-up (ms) | client fit (ms) | messaging (s) "
        "| aggregation (s) | centralized evaluation (s) | checkpoints (s) | other (s) "
        "| start to first fit (s) | last round to exit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["breakdown"]
        lines.append(
            f"| {r['every']} | {r['sampled']} | {r['federated_seconds_per_round']:.2f} | "
            f"{r['plain_seconds_per_round']:.2f} | {r['ratio']:.2f} | "
            f"{b['client_training']:.2f} | {1000 * b['client_setup']:.0f} | "
            f"{1000 * b['client_fit']:.0f} | {b['dispatch']:.2f} | {b['aggregation']:.2f} | "
            f"{b['centralized_evaluation']:.2f} | {b['checkpoint']:.2f} | {b['between']:.2f} | "
            f"{r['first_fit_seconds']:.1f} | {r['exit_seconds']:.1f} |"
        )
    lines += [
        "",
        "messaging: client training minus the clients' own set-up and fit, spread over the "
        f"{WORKERS} workers (dispatch, Ray, replies, waiting for the slowest).",
        "",
        "Commands (a):",
        "",
    ] + [f"- `{r['command']}`" for r in results]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run each S, or (internally) one plain-loop worker."""
    if len(sys.argv) > 3 and sys.argv[1] == "--plain-worker":
        worker, sampled = int(sys.argv[2]), int(sys.argv[3])
        print(json.dumps(plain_worker(worker, sys.argv[4:], sampled)))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sampled", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--every", type=int, nargs="+", default=[10], help="evaluation.every_n_rounds"
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "overrides", nargs="*", help="more config overrides, e.g. evaluation.max_samples=1000"
    )
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--record", type=Path, help="markdown file to write the table into")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-cross-device-") as workdir:
        results = []
        for every in args.every:
            for sampled in args.sampled:
                data = args.data.resolve()
                extra, where = args.overrides, Path(workdir)
                results.append(measure(sampled, data, args.rounds, every, extra, where))
                print(json.dumps(results[-1]), file=sys.stderr)
    sampled_list = " ".join(str(s) for s in args.sampled)
    every_list = " ".join(str(k) for k in args.every)
    invocation = (
        f"--sampled {sampled_list} --rounds {args.rounds} --every {every_list} --data <data>"
        + "".join(f" {o}" for o in args.overrides)
    )
    table = markdown(results, invocation)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.record:
        from accuracy import record

        record(args.record, "cross_device", table)


if __name__ == "__main__":
    main()
