"""`fl-lightning deploy-local`: Flower's Deployment Engine on this machine, TLS and auth on.

One SuperLink and N SuperNodes run as separate processes, exactly as on N machines
(docs/deployment.md): the SuperLink serves TLS with a throwaway CA, only registered
SuperNode keys may connect, and each SuperNode gets its partition through
`--node-config`. The run is submitted with `flwr run`, like any Flower app; every
process started here is stopped when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

from fl_lightning.certificates import ServerCredentials, make_node_key, make_server_credentials
from fl_lightning.errors import DeploymentError, Stopped
from fl_lightning.yaml_input import dump_yaml

# Every process of one deployment carries this variable (value: the deployment's folder),
# so the ones Flower starts itself (SuperExec, ServerApp, ClientApps) can be found and
# stopped even if they left their parent's process group.
MARKER = "FL_LIGHTNING_DEPLOYMENT"
# Marks the `flwr run` client alone: it is stopped first, before the SuperLink it talks to,
# or it reports the lost connection over the user's terminal after the deployment is gone.
RUN_MARKER = "FL_LIGHTNING_RUN_CLIENT"
_CONNECTION = "deploy-local"
_HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What stops a deployment; SIGHUP where the platform has it (a closed terminal, ssh gone).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)

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


def flower_executable(name: str) -> str:
    """Path of a Flower console script beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"'{name}' not found: install flwr in this environment")
    return found


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` giving the child SIGTERM when this process dies, even by SIGKILL (Linux).

    None elsewhere, or where libc's `prctl` cannot be found: there a killed deploy-local
    leaves its processes to `marked_processes`. Linux sends the signal when the *thread*
    that started the child ends: start deployments from a thread that outlives them.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP raise `Stopped`, so every cleanup runs.

    Only the first signal raises: a second one, while the deployment is being stopped,
    must not cut that short. The previous handlers are back on exit; signals ignored
    before (`nohup`) stay ignored. Outside the main thread (where Python sets no
    handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Stopped(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_held() -> Iterator[Callable[[Callable[[], None] | None], Callable[[], None]]]:
    """Hold STOP_SIGNALS while inside; they are delivered on the way out.

    Yields a wrapper for a child's `preexec_fn` that gives the child the signal mask of
    before (a child inherits the held mask across exec otherwise).
    """
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def unblock(preexec: Callable[[], None] | None) -> Callable[[], None]:
        def child() -> None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
            if preexec is not None:
                preexec()

        return child

    try:
        yield unblock
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def marked_processes(marker: str | None = None, variable: str = MARKER) -> list[int]:
    """PIDs of live processes whose environment carries `variable=marker` (any value: None)."""
    needle = f"{variable}={marker or ''}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        variables = environ.split(b"\0")
        found = (
            any(v.startswith(needle) for v in variables) if marker is None else needle in variables
        )
        if state != "Z" and found:
            pids.append(int(entry.name))
    return pids


def kill_marked(marker: str, variable: str = MARKER, attempts: int = 50) -> list[int]:
    """SIGKILL the processes marked `variable=marker` until none is left (or `attempts`
    rounds, 0.1 s apart, have passed); the PIDs still alive then."""
    for _ in range(attempts):
        pids = marked_processes(marker, variable)
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return marked_processes(marker, variable)


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
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    _credentials: ServerCredentials | None = field(default=None, init=False)
    # The node id the SuperLink registered for SuperNode k's key (partition k), once started.
    node_ids: list[int] = field(default_factory=list, init=False)
    _run: subprocess.Popen[bytes] | None = field(default=None, init=False)  # `flwr run`
    port: int = field(default=0, init=False)

    @property
    def logs(self) -> Path:
        """Folder of each process's log (superlink.log, supernode-<k>.log)."""
        return self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        """Environment of every process: a private FLWR_HOME, offline installs, the marker."""
        env = dict(os.environ)
        # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp)
        # by name: they must come from this environment even when it is not activated.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(
            {
                "FLWR_HOME": str(self.workdir / "flwr-home"),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                MARKER: str(self.workdir),
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )
        # The user's project (the working directory, and the config's folder the CLI names)
        # is importable in every process, as in `fl-lightning run`.
        project = [os.getcwd(), env.pop("FL_LIGHTNING_IMPORT_PATH", None)]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*project, env.get("PYTHONPATH")]))
        return env

    @property
    def credentials(self) -> ServerCredentials:
        """The CA and SuperLink certificate (made on entry)."""
        assert self._credentials is not None, "use LocalDeployment as a context manager"
        return self._credentials

    def __enter__(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        try:
            self._start()
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

    def _start(self) -> None:
        self._credentials = make_server_credentials(self.workdir / "certs", _HOST)
        self.port = free_port()
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        # The `flwr` CLI's connection: address and the CA that signed the SuperLink.
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{_CONNECTION}"\n\n'
            f"[superlink.{_CONNECTION}]\n"
            f'address = "{_HOST}:{self.port}"\n'
            f'root-certificates = "{self.credentials.ca_cert}"\n'
        )
        c = self.credentials
        self.spawn(
            "superlink",
            [
                flower_executable("flower-superlink"),
                *("--ssl-ca-certfile", str(c.ca_cert)),
                *("--ssl-certfile", str(c.server_cert)),
                *("--ssl-keyfile", str(c.server_key)),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                *("--host", _HOST, "--port", str(self.port)),
            ],
        )
        self._wait_for_port()
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
        self._wait_for_nodes(set(node_ids))
        self.node_ids = [int(node) for node in node_ids]

    def spawn(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `command` in its own process group, logging to `logs/<name>.log`."""
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        log.close()
        self._procs[name] = proc
        return proc

    def start_supernode(
        self, name: str, private_key: Path, node_config: str, root_certificates: Path
    ) -> subprocess.Popen[bytes]:
        """Start one SuperNode against this SuperLink (tests use it with wrong credentials)."""
        return self.spawn(
            name,
            [
                flower_executable("flower-supernode"),
                *("--superlink", f"{_HOST}:{self.port}"),
                *("--root-certificates", str(root_certificates)),
                *("--auth-supernode-private-key", str(private_key)),
                *("--node-config", node_config),
                # Each SuperNode serves its ClientApps' Runtime API on a port of its own.
                *("--host", _HOST, "--port", str(free_port())),
                "--max-retries",
                "3",
            ],
            env={}
            if self.threads_per_node is None
            else {"OMP_NUM_THREADS": str(self.threads_per_node)},
        )

    def flwr(self, *args: str, timeout: float = 60.0) -> dict:
        """Run a `flwr` CLI command against this SuperLink with `--format json`; its reply."""
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
        return str(self.flwr("supernode", "register", str(public_key))["node-id"])

    def online_nodes(self) -> set[str]:
        """Ids of the SuperNodes the SuperLink sees online."""
        nodes = self.flwr("supernode", "ls")["nodes"]
        return {str(n["node-id"]) for n in nodes if n["status"] == "online"}

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
                raise DeploymentError(
                    f"{name} exited with code {proc.returncode} while starting: "
                    + " | ".join(line.strip() for line in tail if line.strip())
                )

    def _wait_for_port(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with socket.create_connection((_HOST, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(f"the SuperLink did not listen on port {self.port} in time")

    def _wait_for_nodes(self, node_ids: set[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if node_ids <= self.online_nodes():
                return
            time.sleep(0.5)
        raise DeploymentError(
            f"not all {len(node_ids)} SuperNodes came online within {self.startup_timeout:.0f} s; "
            f"see {self.logs}"
        )

    def submit(self, config: dict, stream: bool = True, verbose: bool = False) -> int:
        """`flwr run` the fl-lightning apps with `config` (a resolved config as a dict).

        The app handed to `flwr run` is a FAB of a pyproject.toml alone: the code comes from
        this environment, where every process of the deployment runs. Returns flwr's exit code.
        """
        app = self.workdir / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(_APP_PYPROJECT)
        config_path = self.workdir / "config.yaml"
        # Each partition is the registered key's: the census refuses it from another node.
        federation = {**config["federation"], "node_ids": self.node_ids}
        config_path.write_text(dump_yaml({**config, "federation": federation}))
        command = [
            flower_executable("flwr"),
            "run",
            str(app),
            _CONNECTION,
            "--run-config",
            f'config-path="{config_path}" verbose={str(verbose).lower()}',
        ]
        if stream:
            command.append("--stream")
        env = {**self.env, RUN_MARKER: str(self.workdir)}
        # A stop signal landing between fork and exec would leave a child that `stop` can
        # find neither by handle nor by marker (its environment is not yet the new one):
        # the signals wait until the handle is kept.
        with signals_held() as unblock:
            self._run = subprocess.Popen(command, env=env, preexec_fn=unblock(die_with_parent()))
        return self._run.wait()

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of this deployment: SIGTERM, then SIGKILL after `grace` s."""
        if self._run is not None and self._run.poll() is None:
            self._run.kill()  # the `flwr run` client first, before the SuperLink it talks to
            self._run.wait()
        kill_marked(str(self.workdir), RUN_MARKER)  # and anything it started
        for proc in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # Whatever is left, in these groups or outside them (Flower's own children).
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_marked(str(self.workdir))


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
                    f"fl-lightning: SuperLink on {_HOST}:{fed.port} (TLS, SuperNode auth), "
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
