"""The processes of a local deployment: start them, find them, stop every one of them.

Every process of one deployment carries `MARKER` in its environment, so the ones Flower
starts itself (SuperExec, ServerApp, ClientApps) can be found and stopped even when they
leave their parent's process group; on Linux they also die with the CLI that started
them (`die_with_parent`), even when it is killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from fl_lightning.errors import DeploymentError, Stopped

# Every process of one deployment carries this variable (value: the deployment's folder).
MARKER = "FL_LIGHTNING_DEPLOYMENT"
# Marks the `flwr run` client alone: it is stopped first, before the SuperLink it talks to,
# or it reports the lost connection over the user's terminal after the deployment is gone.
RUN_MARKER = "FL_LIGHTNING_RUN_CLIENT"
HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What stops a deployment; SIGHUP where the platform has it (a closed terminal, ssh gone).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


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
        s.bind((HOST, 0))
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
def signals_held() -> Iterator[None]:
    """Defer STOP_SIGNALS' handlers while inside (main thread); they run on the way out.

    Blocking the signals in this thread would not do: a signal sent to the process goes
    to any thread that does not block it (torch's, gRPC's), and Python then runs the
    handler in the main thread at its next bytecode, e.g. inside `subprocess.Popen` after
    the fork, before the caller holds the child's handle. Children start with the default
    dispositions (exec resets handled signals), so they need nothing undone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(pending):  # each once, in the order they came
            signal.raise_signal(signum)


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


def wait_for_port(host: str, port: int, timeout: float, processes: ProcessGroup) -> None:
    """Wait until something listens on `host:port` (DeploymentError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check_alive()
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"the SuperLink did not listen on port {port} in time")


class ProcessGroup:
    """Processes started in their own process groups, each logging to `<logs>/<name>.log`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start `command` in its own process group, dying with this process."""
        log = (self.logs / f"{name}.log").open("wb")
        with signals_held():  # a stop signal waits until the handle is kept, for `stop`
            self.procs[name] = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        log.close()
        return self.procs[name]

    def check_alive(self) -> None:
        """Raise DeploymentError, with the tail of its log, if a process has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
                raise DeploymentError(
                    f"{name} exited with code {proc.returncode} while starting: "
                    + " | ".join(line.strip() for line in tail if line.strip())
                )

    def stop(self, grace: float) -> None:
        """SIGTERM every group, then SIGKILL what is left after `grace` s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
