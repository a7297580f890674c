"""`fl-lightning` command line. Imports stay lazy so `--help` answers without loading torch."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from fl_lightning.config import Config
    from fl_lightning.rundir import RunDir


def _gpu_list(text: str) -> list[int]:
    from fl_lightning.node_config import parse_devices

    try:
        return parse_devices(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-lightning",
        description="Federated learning of Lightning image classifiers with Flower.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a federated simulation from a YAML config")
    deploy = commands.add_parser(
        "deploy-local",
        help="run a YAML config on Flower's Deployment Engine on this machine: "
        "a TLS SuperLink and N authenticated SuperNodes, all stopped at the end",
    )
    for command in (run, deploy):
        command.add_argument("config", help="YAML config, e.g. configs/mnist.yaml")
        command.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="dotted overrides, e.g. federation.num_rounds=2",
        )
        command.add_argument(
            "--verbose", action="store_true", help="show Flower's (and Ray's) own logs"
        )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run of the same config from its last completed round",
    )
    deploy.add_argument(
        "--nodes",
        type=int,
        help="SuperNodes to start, one client each (default and override: federation.num_clients)",
    )
    deploy.add_argument(
        "--gpus",
        type=_gpu_list,
        default=[],
        help="CUDA devices to spread the SuperNodes over, one each, e.g. 0,1 "
        "(sets node-config gpus; default: the trainer.* keys decide)",
    )
    return parser


def _prepare(path: str, overrides: list[str], claim_output: bool = True) -> Config:
    """Load and validate the config and check data and model, before any process starts."""
    from fl_lightning.config import load_config
    from fl_lightning.partition import client_splits

    cfg = load_config(path, overrides)
    if claim_output:
        from fl_lightning.rundir import check_claimable, run_dir_path

        # A directory the run could not claim is said before any data is decoded.
        check_claimable(run_dir_path(cfg), "output.dir" if cfg.output.dir else "output.root")
    # Fail on missing data or impossible partitions here, with one line, not inside Ray.
    client_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    if cfg.privacy.mode != "none":
        from fl_lightning.data import load_splits
        from fl_lightning.models import build_model

        build_model(cfg, load_splits(cfg.data).num_classes)  # can Opacus train this model?
    return cfg


def _report(cfg: Config, run: RunDir) -> int:
    """Print how the run ended and its summary; the exit code."""
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


def run_command(args: argparse.Namespace) -> int:
    """Load and validate the config, check the data, then simulate."""
    from fl_lightning.errors import ConfigError
    from fl_lightning.rundir import create_run_dir
    from fl_lightning.simulation import backend_config, run_simulation

    cfg = _prepare(args.config, args.overrides, claim_output=args.resume is None)
    backend_config(cfg)  # Ray's settings are valid before any directory is made
    if args.resume is None:
        run = create_run_dir(cfg)
        print(f"fl-lightning: writing {run.path}", file=sys.stderr)
        run_simulation(cfg, run, verbose=args.verbose)
        return _report(cfg, run)
    from fl_lightning import resume

    if cfg.secure_aggregation.enabled:
        raise ConfigError(
            "--resume: runs with secure_aggregation.enabled cannot be resumed yet "
            "(Flower's SecAgg+ workflow has no round offset); start the run again"
        )
    run, state = resume.load(cfg, Path(args.resume))
    print(f"fl-lightning: resuming {run.path} after round {state.round}", file=sys.stderr)
    run_simulation(cfg, run, verbose=args.verbose, resume=state)
    return _report(cfg, run)


def deploy_command(args: argparse.Namespace) -> int:
    """Validate as `run` does, then run on a local TLS SuperLink and `--nodes` SuperNodes."""
    import secrets

    from fl_lightning.deployment import deploy_local
    from fl_lightning.rundir import CLAIM_TOKEN_ENV, claim, run_dir_path

    overrides = list(args.overrides)
    if args.nodes is not None:
        overrides.append(f"federation.num_clients={args.nodes}")
    cfg = _prepare(args.config, overrides)
    path = run_dir_path(cfg).resolve()
    # Claimed here, before any process starts (the deployment's logs are kept in it); the
    # ServerApp, holding the claim's token, takes it over and writes the run.
    token = secrets.token_hex(16)
    run = claim(path, "output.dir" if cfg.output.dir is not None else "output.root", token)
    config = cfg.to_dict()
    config["output"]["dir"] = str(path)  # the ServerApp writes exactly here
    print(f"fl-lightning: writing {path}", file=sys.stderr)
    deploy_local(
        config,
        cfg.federation.num_clients,
        args.gpus,
        keep=path,
        verbose=args.verbose,
        # Each SuperNode's threads, like each simulated client's CPUs under Ray.
        threads_per_node=max(1, int(cfg.federation.client_resources.num_cpus)),
        env={CLAIM_TOKEN_ENV: token},
    )
    return _report(cfg, run)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fl-lightning` console script."""
    parser = _parser()
    # KEY=VALUE overrides may also follow options (`deploy-local CONFIG --nodes 2 a.b=1`).
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    from fl_lightning.errors import FlLightningError, Stopped

    try:
        return deploy_command(args) if args.command == "deploy-local" else run_command(args)
    except FlLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:  # deploy-local, on SIGINT, SIGTERM or SIGHUP: all cleaned up
        print(f"fl-lightning: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "ended by this signal"


def console() -> NoReturn:
    """The `fl-lightning` console script: `main`, then a prompt exit."""
    code = main()
    # Everything a command writes is written and closed, and Ray is shut down, by now; the
    # interpreter's own teardown of torch, Lightning and Ray's modules would only cost about
    # 2 s more (mypy exits this way too). Not in `main`: tests call it in-process.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    console()
