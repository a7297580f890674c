"""Feed `fl-lightning run` bad input and print, as markdown, what each one got back.

    python benchmarks/bad_input.py --data ../shared/data

Each case is `fl-lightning run <config> data.root=<data> <bad override>` (or a bad config
file) in a subprocess, in a scratch folder that also holds its output root and decoded-data
cache. The table says, per input: the exit code (2 for bad input), the line printed (one
line naming the key), whether a traceback was printed, and whether anything was written
(any file created or changed under the scratch folder, or at the bad path itself). Every
case fails at load, so the whole table takes seconds per case, not a training run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "fl-lightning"
CONFIG = REPO / "configs" / "mnist.yaml"

# A case: (what the table shows, builder of (config path, overrides) in a scratch folder).
Case = tuple[str, Callable[[Path, Path], tuple[Path, list[str]]]]


def _override(*overrides: str) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    return lambda scratch, data: (CONFIG, list(overrides))


def _existing_file(scratch: Path, data: Path) -> tuple[Path, list[str]]:
    target = scratch / "notes.txt"
    target.write_text("a file that is not a run directory\n")
    return CONFIG, [f"output.dir={target}"]


def _unwritable_dir(scratch: Path, data: Path) -> tuple[Path, list[str]]:
    if os.geteuid() == 0:  # root writes through any mode bits: use a folder nobody can write
        return CONFIG, ["output.dir=/sys/fl-lightning-bad-input/run"]
    locked = scratch / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return CONFIG, [f"output.dir={locked / 'run'}"]


def _duplicate_section(scratch: Path, data: Path) -> tuple[Path, list[str]]:
    path = scratch / "twice.yaml"
    path.write_text(CONFIG.read_text() + "data:\n  batch_size: 64\n")
    return path, []


def _malformed(scratch: Path, data: Path) -> tuple[Path, list[str]]:
    path = scratch / "malformed.yaml"
    path.write_text("data:\n  dataset: mnist\n   root: [unclosed\n")
    return path, []


def _own_model(*overrides: str) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    """A config naming a LightningModule by class_path (the package's MLP), then `overrides`."""

    def build(scratch: Path, data: Path) -> tuple[Path, list[str]]:
        path = scratch / "own_model.yaml"
        path.write_text(
            "model:\n  class_path: fl_lightning.models.MLP\n  init_args: {num_classes: 10}\n"
        )
        return path, list(overrides)

    return build


NO_TEST_DATA = """
import lightning.pytorch as pl


class NoTestData(pl.LightningDataModule):
    def __init__(self, root: str):
        super().__init__()
"""


def _datamodule_without_test_data(scratch: Path, data: Path) -> tuple[Path, list[str]]:
    (scratch / "no_test_data.py").write_text(NO_TEST_DATA)  # the scratch folder is the cwd
    path = scratch / "own_data.yaml"
    path.write_text(
        "model:\n  class_path: fl_lightning.models.MLP\n  init_args: {num_classes: 10}\n"
        "data:\n  class_path: no_test_data.NoTestData\n  init_args: {root: .}\n"
    )
    return path, []


def _alias_bomb(scratch: Path, data: Path) -> tuple[Path, list[str]]:
    """The review's 756-byte config: nine levels of nine-way aliases (9**10 values)."""
    lines = ["model:", "  class_path: fl_lightning.models.MLP", "  init_args:"]
    lines.append(f"    a0: &a0 [{', '.join(['1'] * 9)}]")
    lines += [f"    a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]" for k in range(1, 10)]
    path = scratch / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, []


LONG = "x" * 300  # a folder name: file systems allow 255 bytes


def _resume_from_a_fifo(scratch: Path, data: Path) -> tuple[Path, list[str]]:
    """A killed run's folder whose checkpoints/resume.pt is a FIFO (a plain open waits)."""
    sys.path.insert(0, str(REPO))
    from fl_lightning.config.load import load_config
    from fl_lightning.config.yaml_input import dump_yaml
    from fl_lightning.data.datasets import load_splits

    cfg = load_config(CONFIG, [f"data.root={data}", f"data.cache_dir={scratch / 'cache'}"])
    load_splits(cfg.data)  # the run's decoded data, as the killed run left it
    run = scratch / "killed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    os.mkfifo(run / "checkpoints" / "resume.pt")
    return CONFIG, ["--resume", str(run)]


CASES: list[Case] = [
    ("`data.root=~nosuchuser/x`", _override("data.root=~nosuchuser/x")),
    ("`data.cache_dir=~nosuchuser/x`", _override("data.cache_dir=~nosuchuser/x")),
    ("`output.dir=` an existing file", _existing_file),
    ("`output.dir=` in an unwritable folder", _unwritable_dir),
    ("`strategy.eta=.nan`", _override("strategy.eta=.nan")),
    ("`strategy.beta_1=5`", _override("strategy.beta_1=5")),
    ("`trainer.precision=bogus`", _override("trainer.precision=bogus")),
    ("`trainer.devices=0`", _override("trainer.devices=0")),
    ("`trainer.limit_train_batches=-1`", _override("trainer.limit_train_batches=-1")),
    # Issue #20: DDP inside a client needs the CPUs it runs on; FSDP is not supported.
    ("`trainer.devices=2` with one CPU reserved per client", _override("trainer.devices=2")),
    ("`trainer.strategy=fsdp`", _override("trainer.strategy=fsdp")),
    ("`seed=4294967296`", _override("seed=4294967296")),
    ("a config with `data:` written twice", _duplicate_section),
    ("a malformed config", _malformed),
    ("a config file that does not exist", lambda scratch, data: (scratch / "missing.yaml", [])),
    # Issue #19: the user's own classes.
    ("`model.class_path=` a module that does not import", _own_model("model.class_path=my.Net")),
    ("`model.class_path=` not a LightningModule", _own_model("model.class_path=torch.nn.Linear")),
    ("`model.init_args.` one the constructor lacks", _own_model("model.init_args.hiden=3")),
    ("`trainer.max_epoch=2` (not a Trainer keyword)", _override("trainer.max_epoch=2")),
    (
        "`trainer.callbacks=` one that does not import",
        _override("trainer.callbacks=[{class_path: my.callbacks.Missing}]"),
    ),
    ("a DataModule with no test data", _datamodule_without_test_data),
    # Issue #24: input that hung, filled memory or ended in a traceback.
    ("a 592-byte config of nested YAML aliases (9**10 values)", _alias_bomb),
    ("`output.dir=` with a folder name of 300 bytes", _override(f"output.dir=/tmp/{LONG}/run")),
    ("`output.experiment=` 300 bytes", _override(f"output.experiment={LONG}")),
    ("`data.root=` with a folder name of 300 bytes", _override(f"data.root=/tmp/{LONG}")),
    ("`seed=` an integer of 5000 digits", _override("seed=" + "1" * 5000)),
    ("`--resume` of a run whose resume.pt is a FIFO", _resume_from_a_fifo),
    ("`federation.num_clients=010` (YAML 1.1: octal 8)", _override("federation.num_clients=010")),
    ("`federation.num_rounds=1:30` (YAML 1.1: 90)", _override("federation.num_rounds=1:30")),
    ("`seed=0x2A` (hexadecimal)", _override("seed=0x2A")),
]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime (what 'written' is judged by)."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def run_case(build: Callable[[Path, Path], tuple[Path, list[str]]], data: Path) -> dict[str, str]:
    """Run one bad input in a fresh scratch folder; what it printed and left behind."""
    with tempfile.TemporaryDirectory(prefix="fl-bad-input-") as folder:
        scratch = Path(folder)
        config, overrides = build(scratch, data)
        before = _snapshot(scratch)
        # A DataModule of the user's takes its own arguments, not the built-in data keys.
        own_data = "data:\n  class_path" in (config.read_text() if config.is_file() else "")
        data_keys = [] if own_data else [f"data.root={data}", f"data.cache_dir={scratch / 'cache'}"]
        command = [
            str(CLI),
            "run",
            str(config),
            *data_keys,
            f"output.root={scratch / 'runs'}",
            *overrides,
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=scratch)
        seconds = time.perf_counter() - started
        after = _snapshot(scratch)
        written = sorted(path.split(os.sep)[0] for path in after if after[path] != before.get(path))
        for path in (scratch / "locked",):
            if path.exists():
                path.chmod(0o700)  # so the scratch folder can be removed
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    shown = lines[-1] if lines else ""
    if len(lines) > 1:
        shown += f" (and {len(lines) - 1} more lines)"
    return {
        "seconds": f"{seconds:.1f}",
        "code": str(done.returncode),
        "line": shown.replace("|", "\\|").replace(str(scratch), "<tmp>"),
        "traceback": "yes" if "Traceback" in done.stderr else "no",
        # The top folders written to, e.g. `cache` (decoded data) or `runs` (a run).
        "written": f"yes: {', '.join(sorted(set(written)))}" if written else "no",
    }


def main() -> None:
    """Run every case and print the markdown table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    if not CLI.exists():
        sys.exit(f"{CLI} is missing: install the project first (make install)")
    data = args.data.resolve()
    print("| Input | Exit code | Seconds | The line printed | Traceback? | Anything written? |")
    print("|---|---|---|---|---|---|")
    for label, build in CASES:
        result = run_case(build, data)
        print(
            f"| {label} | {result['code']} | {result['seconds']} | {result['line']} "
            f"| {result['traceback']} | {result['written']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
