"""`fl-lightning run`: the apps under Flower's Simulation Engine (Ray) on one machine."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from flwr.clientapp.typing import Mod

from fl_lightning.config.schema import Config
from fl_lightning.config.trainer_flags import device_count
from fl_lightning.errors import ConfigError
from fl_lightning.server.rundir import RunDir

if TYPE_CHECKING:
    from fl_lightning.server.resume_state import ResumeState


def backend_config(cfg: Config) -> dict:
    """Ray backend settings: each client reserves `federation.client_resources`."""
    resources = cfg.federation.client_resources
    if cfg.trainer.accelerator in ("gpu", "cuda") and resources.num_gpus == 0:
        raise ConfigError(
            "federation.client_resources.num_gpus: is 0 while trainer.accelerator is "
            f"{cfg.trainer.accelerator!r}, and Ray hides the GPUs from clients that reserve "
            "none; set 1 (a GPU per client) or a fraction such as 0.2 (clients share one)"
        )
    _check_resources_for_devices(cfg)
    if cfg.federation.node_ids is not None:
        raise ConfigError(
            "federation.node_ids: binds partitions to a deployment's registered SuperNodes; "
            "a simulation makes its own nodes: remove it (deploy-local sets it itself)"
        )
    return {
        "client_resources": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus},
        # On a cluster, Ray counts every node's CPUs and GPUs itself.
        "init_args": {"address": cfg.federation.ray_address, "logging_level": logging.WARNING}
        if cfg.federation.ray_address
        else {"num_cpus": os.cpu_count() or 1, "logging_level": logging.WARNING},
    }


def _check_resources_for_devices(cfg: Config) -> None:
    """A client training on N > 1 devices reserves N CPUs (or N GPUs) from Ray.

    (One device may share: `num_gpus: 0.2` puts five clients on one GPU.)
    """
    devices = device_count(cfg.trainer) or 1
    resources = cfg.federation.client_resources
    gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    reserved = resources.num_gpus if gpu else resources.num_cpus
    if devices > 1 and reserved < devices:
        key = "num_gpus" if gpu else "num_cpus"
        raise ConfigError(
            f"federation.client_resources.{key}: is {reserved:g} while trainer.devices "
            f"trains each client on {devices} {'GPUs' if gpu else 'CPU processes'}; reserve "
            f"at least {devices} (federation.client_resources.{key}={devices})"
        )


def _drop_actor_termination(record: logging.LogRecord) -> bool:
    # Flower's actors say it at every run's end, in every worker: nothing went wrong.
    return "Manually terminating" not in record.getMessage()


def _set_up_worker(cfg: Config, verbose: bool) -> None:
    """Ray worker start-up: Flower's end-of-run chatter off (unless verbose) and, for CPU
    runs, torch, Lightning and the dataset loaded (`_warm_up`)."""
    if not verbose:
        logging.getLogger("flwr").addFilter(_drop_actor_termination)
    if cfg.trainer.accelerator == "cpu":
        _warm_up(cfg)


def _warm_up(cfg: Config) -> None:
    """Import torch and Lightning and map the dataset, once per worker.

    Otherwise every worker pays both (seconds) on its first message, inside round 1.
    """
    # Ray sets OMP_NUM_THREADS from the actor's CPUs only after this hook, and torch reads
    # it once, at import: set it as Ray would, or two 2-thread clients oversubscribe 2 cores.
    num_cpus = cfg.federation.client_resources.num_cpus
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(num_cpus))))
    try:
        from fl_lightning.client import training  # noqa: F401  (torch, Lightning)

        if cfg.data.class_path is None:  # a DataModule of the user's loads on first use
            from fl_lightning.data.partition import client_splits

            client_splits(cfg.data, cfg.federation.num_clients, cfg.seed)  # cached per process
    except Exception:
        # A worker that cannot load the data fails its first message instead, where the
        # strategy reports the client's error; a failed hook would only kill the worker.
        pass


def _import_server_modules() -> None:
    """Import what the ServerApp needs: torch, Lightning and torchmetrics."""
    # On failure the ServerApp imports it again, and reports the error there.
    with contextlib.suppress(Exception):
        import fl_lightning.server.evaluation  # noqa: F401


def start_ray(cfg: Config, verbose: bool = False) -> bool:
    """Start Ray for this run unless it is running; True when this call started it.

    Flower would start Ray itself (`backend_config`'s init_args); starting it here adds
    the workers' set-up, with the warm-up for CPU runs. GPU runs skip that: Ray assigns
    an actor its GPUs after the hook, and an early torch import could fix the devices it
    sees.
    """
    import ray

    if ray.is_initialized():
        return False
    # As Flower's RayBackend: workers see this driver's sys.path.
    runtime_env: dict = {"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}}

    def set_up() -> None:  # Ray exports the hook by name: a function, not a partial
        _set_up_worker(cfg, verbose)

    runtime_env["worker_process_setup_hook"] = set_up
    # The server's Lightning import (seconds) runs while Ray starts its processes rather
    # than after, when it would compete with the workers' own imports for the cores.
    preload = threading.Thread(target=_import_server_modules, name="preload", daemon=True)
    preload.start()
    ray.init(include_dashboard=False, runtime_env=runtime_env, **backend_config(cfg)["init_args"])
    preload.join()
    return True


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower's per-step INFO logs and Ray's tips off for the run, put back after it."""
    # Flower logs every sampling and aggregation step; our tracker prints one line per round.
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(_drop_run_simulation_deprecation)
    flwr_logger.addFilter(_drop_client_tracebacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
        try:
            yield
        finally:
            flwr_logger.removeFilter(_drop_client_tracebacks)
            flwr_logger.removeFilter(_drop_run_simulation_deprecation)
            flwr_logger.setLevel(level)


def _drop_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    # `flwr run` would start a SuperLink process; the in-process engine is what a
    # one-machine simulation wants, so its deprecation notice is not the user's concern.
    return "`run_simulation` function is deprecated" not in record.getMessage()


def _drop_client_tracebacks(record: logging.LogRecord) -> bool:
    # Flower logs every failed client message with Ray's full traceback; the strategy says
    # each distinct client error once, readably (fl_lightning.server.reply_screen).
    # --verbose keeps both.
    # RayBackend adds a line without the error ("An exception was raised ...") to each.
    return not (
        record.levelno >= logging.ERROR
        and record.pathname.endswith(("vce_api.py", "raybackend.py"))
    )


def _in_run_dir(cfg: Config, run: RunDir) -> Config:
    """`cfg` naming the run directory the server chose (where `output.client_logs` go)."""
    output = dataclasses.replace(cfg.output, dir=str(run.path.resolve()))
    return dataclasses.replace(cfg, output=output)


def run_simulation(
    cfg: Config,
    run: RunDir,
    verbose: bool = False,
    client_mods: Sequence[Mod] = (),
    resume: ResumeState | None = None,
) -> None:
    """Simulate `federation.num_clients` SuperNodes running the ClientApp against the ServerApp,
    then write `output.client_report` if the run finished.

    `client_mods` wrap every client message: a hook for tests that inject faults, not
    reachable from a config.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fl_lightning.client_app import make_client_app
    from fl_lightning.server_app import make_server_app

    with contextlib.ExitStack() as quiet:
        if not verbose:
            quiet.enter_context(_quiet_flower())
        started = start_ray(cfg, verbose)
        try:
            flwr_run_simulation(
                server_app=make_server_app(cfg, run, resume=resume),
                client_app=make_client_app(_in_run_dir(cfg, run), mods=client_mods),
                num_supernodes=cfg.federation.num_clients,
                backend_config=backend_config(cfg),
                verbose_logging=verbose,
            )
        finally:
            if started:
                import ray

                ray.shutdown()
    if cfg.output.client_report and run.last_round() >= cfg.federation.num_rounds:
        from fl_lightning.run.client_report import write_client_report

        write_client_report(cfg, run)  # every client's data is here: on the driver, not the server
