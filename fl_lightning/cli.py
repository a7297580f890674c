"""`fl-lightning` command line. Imports stay lazy so `--help` answers without loading torch."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fl_lightning.vocabulary import NUM_PARTITIONS, PARTITION_ID

if TYPE_CHECKING:
    from fl_lightning.config.schema import Config
    from fl_lightning.server.rundir import RunDir


def _gpu_list(text: str) -> list[int]:
    from fl_lightning.config.node_config import parse_devices

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
        "--node-config",
        action="append",
        default=[],
        metavar="KEY=VALUE ...",
        help="settings of one SuperNode, once per node in order, e.g. "
        """--node-config 'data-root="/sites/a"' --node-config 'data-root="/sites/b"'""",
    )
    deploy.add_argument(
        "--gpus",
        type=_gpu_list,
        default=[],
        help="CUDA devices to spread the SuperNodes over, one each, e.g. 0,1 "
        "(sets node-config gpus; default: the trainer.* keys decide)",
    )
    init = commands.add_parser(
        "init",
        help="write a small working project (a LightningModule, a DataModule, a config) "
        "to start from",
    )
    init.add_argument("folder", help="where to write it: a folder that does not exist or is empty")
    init.add_argument(
        "--data-root",
        help="the folder holding MNIST/, written into the config (downloaded there if "
        "missing; default: FOLDER/data)",
    )
    return parser


def _prepare(
    path: str,
    overrides: list[str],
    claim_output: bool = True,
    check: Callable[[Config], object] | None = None,
) -> Config:
    """Load and validate the config and check data and model, before any process starts.

    `check` (e.g. the simulation's resources) runs first, before any data is read.
    """
    from fl_lightning.config.load import load_config

    cfg = load_config(path, overrides)
    if cfg.output.loggers:  # the server's alone: clients load the config without them
        from fl_lightning.config.loggers import check_loggers

        check_loggers(cfg.output.loggers)
    if check is not None:
        check(cfg)
    if claim_output:
        from fl_lightning.server.rundir import check_claimable, run_dir_path

        # A directory the run could not claim is said before any data is decoded.
        check_claimable(run_dir_path(cfg), "output.dir" if cfg.output.dir else "output.root")
    if cfg.model.class_path is not None:
        _check_model(cfg)  # a user's constructor needs no data: refused before any is read
    # Fail on missing data or impossible partitions here, with one line, not inside Ray.
    if cfg.data.class_path is None:
        from fl_lightning.data.partition import client_splits

        client_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    else:
        from fl_lightning.data.loaders import central_test_loader

        central_test_loader(cfg)  # the server's test data: there, and not empty
    if cfg.model.class_path is None:
        _check_model(cfg)  # a built-in model is sized by the data
    from fl_lightning.data.loaders import check_fit_validation

    check_fit_validation(cfg)
    return cfg


def _check_model(cfg: Config) -> None:
    """Build the module as the server will: its constructor, Opacus, BatchNorm all checked."""
    from fl_lightning.models.build import build_model
    from fl_lightning.models.trainer import missing_steps

    model = build_model(cfg)  # a user's constructor; under DP, can Opacus train it? BatchNorm?
    for line in missing_steps(model):
        print(f"fl-lightning: {line}", file=sys.stderr)


def _report(cfg: Config, run: RunDir) -> int:
    """Print how the run ended and its summary; the exit code."""
    finished = run.last_round()
    if run.stopped.exists():
        print(f"fl-lightning: stopped early: {run.stopped.read_text().strip()}", file=sys.stderr)
    elif finished < 0:
        print(
            "error: the run ended before its first round, so nothing of it was kept "
            f"(--verbose shows Flower's logs); {run.path} is free to use again",
            file=sys.stderr,
        )
        return 1
    elif finished < cfg.federation.num_rounds:
        print(
            f"error: the run stopped after round {finished} of {cfg.federation.num_rounds}; "
            f"its results so far are in {run.path} (--verbose shows Flower's logs)",
            file=sys.stderr,
        )
        return 1
    print(run.summary.read_text())
    return 0


def _enter(config: str) -> None:
    """This process's entry into a run: Lightning quiet, and the user's project importable
    (the working directory and the config's folder), here and in the processes it starts."""
    from fl_lightning.models.trainer import setup_lightning_process

    setup_lightning_process()
    for folder in (os.getcwd(), str(Path(config).resolve().parent)):
        if folder not in sys.path:
            sys.path.append(folder)


def run_command(args: argparse.Namespace) -> int:
    """Load and validate the config, check the data, then simulate."""
    _enter(args.config)
    from fl_lightning.errors import ConfigError
    from fl_lightning.run.simulation import backend_config, run_simulation
    from fl_lightning.server.rundir import create_run_dir

    # Ray's settings are checked before any data is read or any directory is made.
    cfg = _prepare(args.config, args.overrides, args.resume is None, check=backend_config)
    if args.resume is None:
        run = create_run_dir(cfg)
        print(f"fl-lightning: writing {run.path}", file=sys.stderr)
        with _released_unless_a_round_ends(run):
            run_simulation(cfg, run, verbose=args.verbose)
        return _report(cfg, run)
    from fl_lightning.server import resume

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

    _enter(args.config)
    from fl_lightning.errors import ConfigError
    from fl_lightning.server.rundir import claim, run_dir_path

    overrides = list(args.overrides)
    if args.nodes is not None:
        overrides.append(f"federation.num_clients={args.nodes}")
    cfg = _prepare(args.config, overrides)
    if cfg.output.client_report:
        raise ConfigError(
            "output.client_report: trains each client's data alone where the run starts, and "
            "a deployment's clients hold their data on their own machines; set it to false "
            "(fl-lightning run writes it)"
        )
    node_configs = _checked_node_configs(cfg, args.node_config, args.gpus)
    path = run_dir_path(cfg).resolve()
    # Claimed here, before any process starts (the deployment's logs are kept in it); the
    # ServerApp, holding the claim's token, takes it over and writes the run.
    token = secrets.token_hex(16)
    run = claim(path, "output.dir" if cfg.output.dir is not None else "output.root", token)
    config = cfg.to_dict()
    config["output"]["dir"] = str(path)  # the ServerApp writes exactly here
    print(f"fl-lightning: writing {path}", file=sys.stderr)
    with _released_unless_a_round_ends(run, keep=("deployment",)):
        _deploy(cfg, config, node_configs, run, args, token)
    return _report(cfg, run)


def _deploy(
    cfg: Config,
    config: dict,
    node_configs: list[str],
    run: RunDir,
    args: argparse.Namespace,
    token: str,
) -> None:
    """`deploy_local` the resolved `config` into `run`, its ServerApp holding the claim."""
    from fl_lightning.run.deployment import deploy_local
    from fl_lightning.server.rundir import CLAIM_TOKEN_ENV

    deploy_local(
        config,
        cfg.federation.num_clients,
        args.gpus,
        node_configs=node_configs,
        keep=run.path,
        verbose=args.verbose,
        # Each SuperNode's threads, like each simulated client's CPUs under Ray.
        threads_per_node=max(1, int(cfg.federation.client_resources.num_cpus)),
        # The config's folder is importable in every process, as for `run` (load_config).
        env={
            CLAIM_TOKEN_ENV: token,
            "FL_LIGHTNING_IMPORT_PATH": str(Path(args.config).resolve().parent),
        },
    )


@contextlib.contextmanager
def _released_unless_a_round_ends(run: RunDir, keep: tuple[str, ...] = ()) -> Iterator[None]:
    """Give the run directory back (`RunDir.release`) if the run records no round; what
    `keep` names (deploy-local's logs) is moved aside, and where is said, unless a signal
    stopped the run (then everything it made is gone, as the signal's line says)."""
    from fl_lightning.errors import Stopped

    stopped = False
    try:
        yield
    except Stopped:
        stopped = True
        raise
    finally:
        aside = run.release(() if stopped else keep)
        if aside is not None:
            print(f"fl-lightning: no round completed; the logs are in {aside}", file=sys.stderr)


def _checked_node_configs(cfg: Config, texts: list[str], gpus: list[int]) -> list[str]:
    """Each `--node-config` as its SuperNode will apply it (with its `--gpus` device),
    checked before any process starts."""
    from flwr.common.config import parse_config_args

    from fl_lightning.config.node_config import apply_node_config
    from fl_lightning.errors import ConfigError

    nodes = cfg.federation.num_clients
    if len(texts) > nodes:
        raise ConfigError(
            f"--node-config: given {len(texts)} times for {nodes} SuperNodes; give it once per "
            "node at most"
        )
    sites = 0
    for k, text in enumerate(texts):
        try:
            settings = parse_config_args([text])
        except Exception:  # Flower's ClickException: the format is wrong
            raise ConfigError(
                f"--node-config {text!r}: write it as key=value pairs, strings quoted, e.g. "
                """'data-root="/sites/a"'"""
            ) from None
        # deploy-local numbers the nodes itself, and --gpus places them.
        owned = sorted({PARTITION_ID, NUM_PARTITIONS, "gpus"} & set(settings))
        if owned:
            raise ConfigError(
                f"--node-config {text!r}: {', '.join(owned)} is set by deploy-local "
                "(--nodes, --gpus); remove it"
            )
        placed = {"gpus": str(gpus[k % len(gpus)])} if gpus else {}  # as deploy_local does
        apply_node_config(cfg, {**settings, **placed, PARTITION_ID: k, NUM_PARTITIONS: nodes})
        if "data-root" in settings:
            sites += 1
            if not Path(str(settings["data-root"])).is_dir():
                raise ConfigError(
                    f"--node-config {text!r}: data-root {settings['data-root']} is not a folder"
                )
    if sites not in (0, nodes):
        raise ConfigError(
            f"--node-config: {sites} of {nodes} SuperNodes name a data-root; give every node "
            "its own, or none (then the config's data is partitioned)"
        )
    return list(texts)


def init_command(args: argparse.Namespace) -> int:
    """Write a new project into `args.folder` and say how to run it."""
    from fl_lightning.run.scaffold import init_project

    folder = Path(args.folder)
    data_root = Path(args.data_root) if args.data_root is not None else None
    init_project(folder, data_root)
    print(f"fl-lightning: wrote a project into {folder}; run it with")
    print(f"  fl-lightning run {folder / 'config.yaml'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fl-lightning` console script."""
    parser = _parser()
    # KEY=VALUE overrides may also follow options (`deploy-local CONFIG --nodes 2 a.b=1`).
    args, extra = parser.parse_known_args(argv)
    # `init` takes no overrides.
    takes_overrides = args.command != "init"
    unknown = [i for i in extra if i.startswith("-") or "=" not in i or not takes_overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if takes_overrides:
        args.overrides = [*args.overrides, *extra]
    from fl_lightning.errors import FlLightningError, Stopped

    try:
        command = {"run": run_command, "deploy-local": deploy_command, "init": init_command}
        return command[args.command](args)
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
