"""SecAgg+ against plain FedAvg on the same config: accuracy and per-round time.

    python benchmarks/secure_aggregation.py --data ../shared/data --record BENCHMARKS.md

Runs configs/mnist_secagg.yaml with secure aggregation off, then on (same seed, so the
clients train on the same data in the same order), and prints both final accuracies,
their difference, and the median seconds per round of each with their ratio. Round 1 is
left out of the median: it includes starting the client processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from accuracy import REPO, markdown, record, run_experiment


def main() -> None:
    """Run both experiments, print and optionally record the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--record", type=Path, help="markdown file to write the table into")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-secagg-") as workdir:
        plain, secure = (
            run_experiment(name, args.data.resolve(), Path(workdir))
            for name in ("mnist_secagg_off", "mnist_secagg")
        )
    plain_round = statistics.median(plain["round_seconds"][1:] or plain["round_seconds"])
    secure_round = statistics.median(secure["round_seconds"][1:] or secure["round_seconds"])
    figures = {
        "plain_final_accuracy": plain["final_accuracy"],
        "secagg_final_accuracy": secure["final_accuracy"],
        "accuracy_difference": secure["final_accuracy"] - plain["final_accuracy"],
        "plain_seconds_per_round": plain_round,
        "secagg_seconds_per_round": secure_round,
        "time/ratio": secure_round / plain_round,
    }
    table = markdown([plain, secure], "", script="benchmarks/secure_aggregation.py") + (
        f"\n\nSecAgg+ vs plain: final accuracy {figures['secagg_final_accuracy']:.4f} vs "
        f"{figures['plain_final_accuracy']:.4f} (difference "
        f"{figures['accuracy_difference']:+.4f}); median seconds per round after round 1: "
        f"{secure_round:.1f} vs {plain_round:.1f}, ratio {figures['time_ratio']:.2f}."
    )
    print(table)
    print(json.dumps(figures), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"runs": [plain, secure], **figures}, indent=2))
    if args.record:
        record(args.record, "secagg", table)


if __name__ == "__main__":
    main()
