"""What one client message costs beyond its arithmetic, in one process, no Ray.

    python benchmarks/client_message.py --data ../shared/data --repeats 30

The ClientApp (`fl_lightning.client_app.app`, what a simulation worker or a SuperNode
calls) handles a train and an evaluate message for one cross-device client: the seed
recipe (`configs/mnist_seed_recipe.yaml`: MNISTNet, AdamW, clipping 1.0) with 500 clients
of 60 training and 60 validation samples, 1 local epoch of batch 10 (6 optimizer steps).
Beside it, alternately, a bare PyTorch loop does the same arithmetic on the same client's
samples (its network and loaders built outside the clock): the global weights loaded, the
same optimizer, clipping and 6 steps, then one forward pass over its 60 validation
samples. Each message goes to another client, as in a cross-device round. One torch
thread, as in a simulation worker with one CPU. It prints the medians in milliseconds and
the fixed cost (handler minus bare arithmetic) per message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch.nn import functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/mnist_seed_recipe.yaml"
CLIENTS = 500  # 60000 MNIST training images: 120 each, half held out for validation
SETUP = [
    f"federation.num_clients={CLIENTS}",
    "data.val_fraction=0.5",
    "data.batch_size=10",
    "trainer.max_epochs=1",
]


def _context(overrides: str, partition_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": CLIENTS},
        state=RecordDict(),
        run_config={"config-path": CONFIG, "overrides": overrides},
    )


def _message(arrays: ArrayRecord, message_type: str) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=1, message_type=message_type)


def _bare(cfg: Any, state: dict[str, torch.Tensor], partition_id: int) -> tuple[float, float]:
    """Seconds of the bare train and evaluate arithmetic on one client's samples."""
    from fl_lightning.data.datasets import IndexedImages, collate_batch, load_splits
    from fl_lightning.data.partition import client_splits
    from fl_lightning.models.build import build_model

    data = load_splits(cfg.data)
    train_idx, val_idx = client_splits(cfg.data, CLIENTS, cfg.seed)[partition_id]

    def loader(indices: torch.Tensor, batch: int, shuffle: bool) -> DataLoader:
        images = IndexedImages(data.train, indices, data.mean, data.std)
        return DataLoader(images, batch_size=batch, shuffle=shuffle, collate_fn=collate_batch)

    train = loader(train_idx, cfg.data.batch_size, True)
    val = loader(val_idx, cfg.data.eval_batch_size, False)
    net = build_model(cfg, data.num_classes).net  # built outside the clock: not arithmetic
    started = time.perf_counter()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    net.train()
    for images, labels in train:
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
    trained = time.perf_counter()
    net.eval()
    with torch.no_grad():
        for images, labels in val:
            logits = net(images)
            F.cross_entropy(logits, labels)
            (logits.argmax(1) == labels).float().mean()
    return trained - started, time.perf_counter() - trained


def measure(data: Path, repeats: int) -> dict[str, Any]:
    """Alternate the handlers and the bare loop over `repeats` clients; medians in ms."""
    from fl_lightning.client_app import app
    from fl_lightning.config.load import load_config
    from fl_lightning.models.build import build_model

    os.chdir(REPO)  # the run config names the config file relative to the project
    torch.set_num_threads(1)
    for name in ("_run_id", "_node_id", "_task_id"):  # what a Flower runtime stamps
        setattr(TaskIdentity, name, 1)
    overrides = [f"data.root={data}", *SETUP]
    cfg = load_config(REPO / CONFIG, overrides)
    state = build_model(cfg).state_dict()
    arrays = ArrayRecord(state)
    names = ("train", "evaluate", "bare_train", "bare_evaluate")
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(repeats + 1):  # the first round warms the caches up and is dropped
        context = _context(" ".join(overrides), partition_id=(7 * i) % CLIENTS)
        started = time.perf_counter()
        app(_message(arrays, MessageType.TRAIN), context)
        trained = time.perf_counter()
        app(_message(arrays, MessageType.EVALUATE), context)
        evaluated = time.perf_counter()
        bare_train, bare_evaluate = _bare(cfg, state, context.node_config["partition-id"])
        if i:
            times["train"].append(trained - started)
            times["evaluate"].append(evaluated - trained)
            times["bare_train"].append(bare_train)
            times["bare_evaluate"].append(bare_evaluate)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        **{f"{k}_ms": v for k, v in ms.items()},
        "train_fixed_ms": ms["train"] - ms["bare_train"],
        "evaluate_fixed_ms": ms["evaluate"] - ms["bare_evaluate"],
        "repeats": repeats,
    }


def markdown(r: dict[str, Any], invocation: str) -> str:
    """One table: handler, bare arithmetic and fixed cost, per message type."""
    return "\n".join(
        [
            f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} "
            f"cores, CPU only, one torch thread) with `python benchmarks/client_message.py "
            f"{invocation}`; medians of {r['repeats']} clients.",
            "",
            "| message | ClientApp (ms) | bare arithmetic (ms) | fixed cost (ms) |",
            "|---|---|---|---|",
            f"| train (60 samples, batch 10, 6 steps) | {r['train_ms']:.1f} | "
            f"{r['bare_train_ms']:.1f} | {r['train_fixed_ms']:.1f} |",
            f"| evaluate (60 samples) | {r['evaluate_ms']:.1f} | "
            f"{r['bare_evaluate_ms']:.1f} | {r['evaluate_fixed_ms']:.1f} |",
        ]
    )


def main() -> None:
    """Parse arguments, measure, print (and record) the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--record", type=Path, help="markdown file to write the table into")
    args = parser.parse_args()
    result = measure(args.data.resolve(), args.repeats)
    print(json.dumps(result), file=sys.stderr)
    table = markdown(result, f"--repeats {args.repeats} --data <data>")
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.record:
        from accuracy import record

        record(args.record, "client_message", table)


if __name__ == "__main__":
    main()
