"""Flower's own cost per message in the Simulation Engine: a ClientApp that does nothing.

    python benchmarks/flower_messaging.py --nodes 100 1000 --sampled 50

For each number of registered nodes, runs Flower's `run_simulation` (Ray backend, 2 CPUs,
one per ClientApp, as fl-lightning runs it on this machine) with a ClientApp that echoes
the message it gets, and a ServerApp that sends `--sampled` messages a round for
`--rounds` rounds, each message carrying MNISTNet's weights (one float32 array of as many
numbers) or nothing. It prints the median seconds per round after the first (which starts
the workers): what dispatch and replies cost before any client code runs, the floor under
`benchmarks/cross_device.py`'s "messaging".
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from datetime import date

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

MNISTNET_PARAMETERS = 186_110


def median_round(nodes: int, sampled: int, rounds: int, payload: bool) -> float:
    """Median seconds of rounds 2.. of `sampled` echo messages among `nodes` nodes."""
    client = ClientApp()

    @client.query()
    def echo(message: Message, context: Context) -> Message:
        return Message(RecordDict(message.content), reply_to=message)

    server = ServerApp()
    seconds: list[float] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < nodes:
            time.sleep(0.1)
        ids = sorted(grid.get_node_ids())
        weights = np.zeros(MNISTNET_PARAMETERS, dtype=np.float32)
        for round_ in range(rounds):
            started = time.monotonic()
            content = RecordDict({"arrays": ArrayRecord([weights])}) if payload else RecordDict()
            chosen = ids[round_ * sampled % nodes :][:sampled]
            messages = [Message(content, dst_node_id=n, message_type="query") for n in chosen]
            replies = list(grid.send_and_receive(messages, timeout=600))
            assert len(replies) == len(messages)
            seconds.append(time.monotonic() - started)

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"num_cpus": 2, "logging_level": logging.WARNING},
        },
    )
    return statistics.median(seconds[1:])


def main() -> None:
    """Time each setup, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--sampled", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows = []
    for nodes in args.nodes:
        for payload in (False, True):
            seconds = median_round(nodes, args.sampled, args.rounds, payload)
            rows.append(
                f"| {nodes} | {'MNISTNet weights' if payload else 'none'} | {seconds:.2f} | "
                f"{1000 * seconds / args.sampled:.1f} |"
            )
            print(rows[-1], file=sys.stderr)
    print(
        f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores, "
        f"CPU only) with `python benchmarks/flower_messaging.py --nodes "
        f"{' '.join(map(str, args.nodes))} --sampled {args.sampled} --rounds {args.rounds}`.\n"
    )
    print(f"| nodes | payload | seconds per round of {args.sampled} | ms per message |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
