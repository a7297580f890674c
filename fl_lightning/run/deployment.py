"""`fl-lightning deploy-local`: Flower's Deployment Engine on this machine, TLS and auth on.

One SuperLink and N SuperNodes run as separate processes, exactly as on N machines
(docs/deployment.md): the SuperLink serves TLS with a throwaway CA, only registered
SuperNode keys may connect, and each SuperNode gets its partition through
`--node-config`. The run is submitted with `flwr run`, like any Flower app; every
process started here is stopped when the run ends, fails or is interrupted
(`fl_lightning.run.processes`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fl_lightning.config.yaml_input import dump_yaml
from fl_lightning.errors import DeploymentError
from fl_lightning.run.certificates import ServerCredentials, make_node_key, make_server_credentials
from fl_lightning.run.processes import (
    HOST,
    MARKER,
    RUN_MARKER,
    ProcessGroup,
    die_with_parent,
    flower_executable,
    free_port,
    kill_marked,
    signals_held,
    stopped_by_signals,
    wait_for_port,
)

_CONNECTION = "deploy-local"

_APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fl-lightning-deploy-local"
version = "0.1.0"
description = "fl-lightning's apps, run by fl-lightning deploy-local"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fl-lightning"

[tool.flwr.app.components]
serverapp = "fl_lightning.server_app:app"
clientapp = "fl_lightning.client_app:app"

[tool.flwr.app.config]
config-path = "config.yaml"
overrides = ""
verbose = false
"""


class FlwrCli:
    """The `flwr` CLI against one SuperLink (its connection in a private FLWR_HOME)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, timeout: float = 60.0) -> dict:
        """Run `flwr ARGS <connection> --format json`; its reply (DeploymentError if failed)."""
        done = subprocess.run(
            [flower_executable("flwr"), *args, _CONNECTION, "--format", "json"],
            capture_output=True,
            env=self.env,
            timeout=timeout,
            check=False,
            preexec_fn=die_with_parent(),
        )
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {"success": False, "error-message": done.stdout.decode() + done.stderr.decode()}
        if not reply.get("success", False):
            raise DeploymentError(
                f"flwr {' '.join(args[:2])} failed: "
                f"{str(reply.get('error-message', reply)).strip().splitlines()[-1:]}"
            )
        return reply

    def register(self, public_key: Path) -> str:
        """Register a SuperNode public key with the SuperLink; returns the node id."""
        return str(self("supernode", "register", str(public_key))["node-id"])

    def online_nodes(self) -> set[str]:
        """Ids of the SuperNodes the SuperLink sees online."""
        nodes = self("supernode", "ls")["nodes"]
        return {str(n["node-id"]) for n in nodes if n["status"] == "online"}

    def wait_online(self, node_ids: set[str], timeout: float, processes: ProcessGroup) -> None:
        """Wait until the SuperLink sees `node_ids` online (DeploymentError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            processes.check_alive()
            if node_ids <= self.online_nodes():
                return
            time.sleep(0.5)
        raise DeploymentError(
            f"not all {len(node_ids)} SuperNodes came online within {timeout:.0f} s; "
            f"see {processes.logs}"
        )


@dataclass
class LocalDeployment:
    """A SuperLink and `num_nodes` authenticated SuperNodes on localhost (a context manager).

    `node_configs[k]` is added to SuperNode k's `--node-config` (e.g. `gpus="0"`);
    `extra_env` is added to every process's environment.
    `threads_per_node` caps each SuperNode's torch threads (OMP_NUM_THREADS), as Ray does for
    simulated clients: N processes with a thread per core each would oversubscribe the cores.
    Logs go to `<workdir>/logs/`. `__exit__` stops every process, Flower's children too.
    """

    num_nodes: int
    workdir: Path
    node_configs: Sequence[str] = ()
    threads_per_node: int | None = None
    startup_timeout: float = 120.0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    _credentials: ServerCredentials | None = field(default=None, init=False)
    # The node id the SuperLink registered for SuperNode k's key (partition k), once started.
    node_ids: list[int] = field(default_factory=list, init=False)
    _run: subprocess.Popen[bytes] | None = field(default=None, init=False)  # `flwr run`
    port: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.processes = ProcessGroup(self.logs)
        self.flwr = FlwrCli(self.env)

    @property
    def logs(self) -> Path:
        """Folder of each process's log (superlink.log, supernode-<k>.log)."""
        return self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        """Environment of every process: a private FLWR_HOME, offline installs, the marker."""
        return _environment(self.workdir, self.extra_env)

    @property
    def credentials(self) -> ServerCredentials:
        """The CA and SuperLink certificate (made on entry)."""
        assert self._credentials is not None, "use LocalDeployment as a context manager"
        return self._credentials

    def __enter__(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        try:
            self._start_superlink()
            self._start_supernodes()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_superlink(self) -> None:
        """TLS with a fresh CA, SuperNode authentication; `flwr`'s connection to it."""
        c = self._credentials = make_server_credentials(self.workdir / "certs", HOST)
        self.port = free_port()
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{_CONNECTION}"\n\n'
            f"[superlink.{_CONNECTION}]\n"
            f'address = "{HOST}:{self.port}"\n'
            f'root-certificates = "{c.ca_cert}"\n'
        )
        superlink = [
            flower_executable("flower-superlink"),
            *("--ssl-ca-certfile", str(c.ca_cert)),
            *("--ssl-certfile", str(c.server_cert)),
            *("--ssl-keyfile", str(c.server_key)),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            *("--host", HOST, "--port", str(self.port)),
        ]
        self.processes.spawn("superlink", superlink, self.env)
        wait_for_port(HOST, self.port, self.startup_timeout, self.processes)

    def _start_supernodes(self) -> None:
        """A registered key and a SuperNode per partition; wait until all are online."""
        node_ids = []
        for k in range(self.num_nodes):
            key = make_node_key(self.workdir / "keys", f"supernode-{k}")
            node_ids.append(self.register(key.public))
            extra = self.node_configs[k] if k < len(self.node_configs) else ""
            self.start_supernode(
                f"supernode-{k}",
                key.private,
                f"partition-id={k} num-partitions={self.num_nodes} {extra}".strip(),
                self.credentials.ca_cert,
            )
        self.flwr.wait_online(set(node_ids), self.startup_timeout, self.processes)
        self.node_ids = [int(node) for node in node_ids]

    def start_supernode(
        self, name: str, private_key: Path, node_config: str, root_certificates: Path
    ) -> subprocess.Popen[bytes]:
        """Start one SuperNode against this SuperLink (tests use it with wrong credentials)."""
        n = self.threads_per_node
        cap = {} if n is None else {"OMP_NUM_THREADS": str(n)}
        command = [
            flower_executable("flower-supernode"),
            *("--superlink", f"{HOST}:{self.port}"),
            *("--root-certificates", str(root_certificates)),
            *("--auth-supernode-private-key", str(private_key)),
            *("--node-config", node_config),
            # Each SuperNode serves its ClientApps' Runtime API on a port of its own.
            *("--host", HOST, "--port", str(free_port())),
            *("--max-retries", "3"),
        ]
        return self.processes.spawn(name, command, {**self.env, **cap})

    def register(self, public_key: Path) -> str:
        """Register a SuperNode public key with the SuperLink; returns the node id."""
        return self.flwr.register(public_key)

    def online_nodes(self) -> set[str]:
        """Ids of the SuperNodes the SuperLink sees online."""
        return self.flwr.online_nodes()

    def submit(self, config: dict, stream: bool = True, verbose: bool = False) -> int:
        """`flwr run` the fl-lightning apps with `config` (a resolved config as a dict);
        returns flwr's exit code."""
        app, config_path = _write_app(self.workdir, config, self.node_ids)
        run_config = f'config-path="{config_path}" verbose={str(verbose).lower()}'
        command = [flower_executable("flwr"), "run", str(app), _CONNECTION]
        command += ["--run-config", run_config, *(["--stream"] if stream else [])]
        env = {**self.env, RUN_MARKER: str(self.workdir)}
        # A stop signal landing between fork and exec would leave a child that `stop` can
        # find neither by handle nor by marker (its environment is not yet the new one):
        # the signals wait until the handle is kept.
        with signals_held():
            self._run = subprocess.Popen(command, env=env, preexec_fn=die_with_parent())
        return self._run.wait()

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of this deployment: SIGTERM, then SIGKILL after `grace` s."""
        if self._run is not None and self._run.poll() is None:
            self._run.kill()  # the `flwr run` client first, before the SuperLink it talks to
            self._run.wait()
        kill_marked(str(self.workdir), RUN_MARKER)  # and anything it started
        self.processes.stop(grace)
        kill_marked(str(self.workdir))  # Flower's own children, outside the groups


def _environment(workdir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of every process of the deployment in `workdir`."""
    env = dict(os.environ)
    # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp)
    # by name: they must come from this environment even when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        {
            "FLWR_HOME": str(workdir / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            MARKER: str(workdir),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    # The user's project (the working directory, and the config's folder the CLI names)
    # is importable in every process, as in `fl-lightning run`.
    project = [os.getcwd(), env.pop("FL_LIGHTNING_IMPORT_PATH", None)]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*project, env.get("PYTHONPATH")]))
    return env


def _write_app(workdir: Path, config: dict, node_ids: list[int]) -> tuple[Path, Path]:
    """The app `flwr run` is handed (a pyproject.toml alone: the code comes from this
    environment, where every process runs) and the config it names."""
    app = workdir / "app"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(_APP_PYPROJECT)
    config_path = workdir / "config.yaml"
    # Each partition is the registered key's: the census refuses it from another node.
    federation = {**config["federation"], "node_ids": node_ids}
    config_path.write_text(dump_yaml({**config, "federation": federation}))
    return app, config_path


def node_gpu_configs(gpus: Sequence[int], num_nodes: int) -> list[str]:
    """Node configs that spread `num_nodes` SuperNodes round-robin over `gpus` (one each)."""
    if not gpus:
        return []
    return [f'gpus="{gpus[k % len(gpus)]}"' for k in range(num_nodes)]


def deploy_local(
    config: dict,
    num_nodes: int,
    gpus: Sequence[int] = (),
    keep: Path | None = None,
    verbose: bool = False,
    threads_per_node: int | None = None,
    env: Mapping[str, str] | None = None,
    node_configs: Sequence[str] = (),
) -> int:
    """Run a resolved config on a local TLS deployment; the logs end up in `keep/deployment`.

    SIGINT, SIGTERM and SIGHUP stop it (`Stopped`), as does the run's end or failure: every
    process it started is stopped and its temporary folder (node keys, certificates) removed.
    Its processes die with it even if it is killed outright (`die_with_parent`).
    `node_configs[k]` is SuperNode k's own `--node-config` (e.g. its `data-root`).
    """
    gpu_configs = node_gpu_configs(gpus, num_nodes)
    nodes = [
        " ".join(part[k] for part in (gpu_configs, node_configs) if k < len(part))
        for k in range(num_nodes)
    ]
    with stopped_by_signals():
        workdir = Path(tempfile.mkdtemp(prefix="fl-lightning-deploy-"))
        fed = LocalDeployment(num_nodes, workdir, nodes, threads_per_node, extra_env=env or {})
        try:
            with fed:
                print(
                    f"fl-lightning: SuperLink on {HOST}:{fed.port} (TLS, SuperNode auth), "
                    f"{num_nodes} SuperNodes online",
                    file=sys.stderr,
                )
                return fed.submit(config, verbose=verbose)
        finally:
            fed.stop()  # again: a signal during the first stop may have cut it short
            if keep is not None and (workdir / "logs").exists():
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copytree(workdir / "logs", keep / "deployment", dirs_exist_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)
