"""The seed setup through the built-in path and through class_path, side by side.

    python benchmarks/class_path.py --data ../shared/data --repeats 2

Runs `configs/mnist.yaml` (model.name, data.dataset) and `configs/mnist_class_path.yaml`
(the same MNISTNet and image DataModule named by class_path, as a user names their own)
alternately, `--repeats` times each, in one invocation. Prints, as markdown, whether every
metric of every round is exactly equal between the two, and each run's wall time.
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

REPO = Path(__file__).resolve().parents[1]
PATHS = {
    "built-in": ("configs/mnist.yaml", "data.root"),
    "class_path": ("configs/mnist_class_path.yaml", "data.init_args.root"),
}
# Keys that measure time, not the model: they differ between any two runs.
TIMING = ("seconds", "time/")


def run(path: str, data: Path, output: Path) -> tuple[float, list[dict]]:
    """One `fl-lightning run` of a config; its wall time and its metrics.jsonl records."""
    config, root_key = PATHS[path]
    command = [sys.executable, "-m", "fl_lightning.cli", "run", config, f"{root_key}={data}"]
    started = time.perf_counter()
    subprocess.run(
        [*command, f"output.dir={output}"], cwd=REPO, check=True, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - started
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return wall, [json.loads(line) for line in lines]


def model_metrics(records: list[dict]) -> list[dict]:
    """Each round's record without its timings."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def main() -> None:
    """Run both paths alternately and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {path: [] for path in PATHS}
    metrics: dict[str, list[list[dict]]] = {path: [] for path in PATHS}
    with tempfile.TemporaryDirectory(prefix="fl-class-path-") as folder:
        for repeat in range(args.repeats):
            for path in PATHS:
                output = Path(folder) / f"{path}-{repeat}"
                wall, records = run(path, args.data.resolve(), output)
                walls[path].append(wall)
                metrics[path].append(model_metrics(records))
    reference = metrics["built-in"][0]
    equal = all(m == reference for runs in metrics.values() for m in runs)
    mean = {path: sum(w) / len(w) for path, w in walls.items()}
    final = reference[-1]
    print(
        f"Measured {date.today().isoformat()} on {platform.machine()} "
        f"({os.cpu_count()} cores) with `python benchmarks/class_path.py --data <data> "
        f"--repeats {args.repeats}`.\n"
    )
    print("| path | wall time per run (s) | mean (s) | test/accuracy after the last round |")
    print("|---|---|---|---|")
    for path in PATHS:
        each = ", ".join(f"{w:.1f}" for w in walls[path])
        accuracy = metrics[path][0][-1]["test/accuracy"]
        print(f"| {path} | {each} | {mean[path]:.1f} | {accuracy:.4f} |")
    ratio = mean["class_path"] / mean["built-in"]
    print(
        f"\nEvery metric of every round equal across all {2 * args.repeats} runs: "
        f"{'yes' if equal else 'no'} ({len(final) - 1} metrics a round). "
        f"class_path / built-in wall time: {ratio:.3f}."
    )


if __name__ == "__main__":
    main()
