"""`fl-lightning` command line. Imports stay lazy so `--help` answers without loading torch."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-lightning",
        description="Federated learning of Lightning image classifiers with Flower.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a federated simulation from a YAML config")
    run.add_argument("config", help="YAML config, e.g. configs/mnist.yaml")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. federation.num_rounds=2",
    )
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Load and validate the config, check the data, then simulate."""
    from fl_lightning.config import load_config
    from fl_lightning.datamodule import client_splits
    from fl_lightning.rundir import create_run_dir
    from fl_lightning.simulation import run_simulation

    cfg = load_config(args.config, args.overrides)
    # Fail on missing data or impossible partitions here, with one line, not inside Ray.
    client_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    if cfg.privacy.mode != "none":
        from fl_lightning.data import load_splits
        from fl_lightning.models import build_model

        build_model(cfg, load_splits(cfg.data).num_classes)  # can Opacus train this model?
    run = create_run_dir(cfg)
    print(f"fl-lightning: writing {run.path}", file=sys.stderr)
    run_simulation(cfg, run, verbose=args.verbose)
    finished = run.last_round()
    if run.stopped.exists():
        print(f"fl-lightning: stopped early: {run.stopped.read_text().strip()}", file=sys.stderr)
    elif finished < cfg.federation.num_rounds:
        print(
            f"error: the run stopped after round {finished} of {cfg.federation.num_rounds}; "
            f"its results so far are in {run.path} (--verbose shows Flower's logs)",
            file=sys.stderr,
        )
        return 1
    print(run.summary.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fl-lightning` console script."""
    args = _parser().parse_args(argv)
    from fl_lightning.errors import FlLightningError

    try:
        return run_command(args)
    except FlLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
