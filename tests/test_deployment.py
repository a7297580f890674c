"""Flower's Deployment Engine on localhost: TLS SuperLink, authenticated SuperNodes, cleanup."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_lightning.cli import main
from fl_lightning.client.ddp import MARKER
from fl_lightning.config.load import load_config
from fl_lightning.run.certificates import make_node_key, make_server_credentials
from fl_lightning.run.deployment import LocalDeployment
from fl_lightning.run.processes import RUN_MARKER, die_with_parent, marked_processes
from tests.test_client_ddp import RankWatch

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_train_samples=300", "data.max_test_samples=200", "federation.num_rounds=1"]


def test_deploy_local_runs_a_round_over_tls_with_two_authenticated_supernodes(
    data_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "deploy-local",
            "configs/mnist.yaml",
            "--nodes",
            "2",
            f"data.root={data_root}",
            *TINY,
            f"output.dir={run}",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert 0.0 <= records[-1]["test/accuracy"] <= 1.0
    assert records[-1]["val/accuracy"] is not None  # both SuperNodes evaluated
    assert (run / "checkpoints" / "last.ckpt").stat().st_size > 0
    config = load_config(run / "config.yaml")
    assert config.federation.num_clients == 2  # --nodes sets it
    superlink = (run / "deployment" / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink  # TLS on
    assert "SuperNode authentication is disabled" not in superlink
    assert (run / "deployment" / "supernode-1.log").exists()
    assert marked_processes() == []  # of any deployment: tests run one at a time


def refused(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Wait for a SuperNode that should give up; its log."""
    assert proc.wait(timeout=120) != 0
    return log.read_text(errors="replace")


def test_supernodes_with_a_wrong_certificate_or_an_unregistered_key_are_refused(
    tmp_path: Path,
) -> None:
    with LocalDeployment(1, tmp_path / "deployment") as fed:
        (registered,) = fed.online_nodes()
        stranger = make_node_key(tmp_path / "keys", "stranger")
        log = refused(
            fed.start_supernode(
                "stranger",
                stranger.private,
                "partition-id=0 num-partitions=1",
                fed.credentials.ca_cert,
            ),
            fed.logs / "stranger.log",
        )
        assert "Failed to activate SuperNode" in log
        # A registered key, but the node trusts another CA: the TLS handshake fails.
        impostor = make_node_key(tmp_path / "keys", "impostor")
        fed.register(impostor.public)
        other_ca = make_server_credentials(tmp_path / "other-ca").ca_cert
        log = refused(
            fed.start_supernode(
                "impostor", impostor.private, "partition-id=0 num-partitions=1", other_ca
            ),
            fed.logs / "impostor.log",
        )
        assert "CERTIFICATE_VERIFY_FAILED" in log
        assert fed.online_nodes() == {registered}
    assert marked_processes(str(tmp_path / "deployment")) == []


def test_a_failed_run_and_an_interrupted_deployment_leave_no_process_behind(
    data_root: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "deployment"
    cfg = load_config("configs/mnist.yaml", [*TINY, f"data.root={data_root}"]).to_dict()
    cfg["federation"]["num_clients"] = 1
    cfg["data"]["root"] = str(tmp_path / "no-such-data")  # the ServerApp fails on it
    cfg["output"]["dir"] = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt), LocalDeployment(1, workdir) as fed:
        fed.submit(cfg)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        assert marked_processes(str(workdir)) != []  # SuperLink and SuperNode still up
        raise KeyboardInterrupt  # the user's Ctrl-C while the deployment runs
    assert marked_processes(str(workdir)) == []


def test_stop_ends_a_flwr_run_client_that_nothing_owns_yet(tmp_path: Path) -> None:
    # A signal may land while `submit` starts `flwr run`, before subprocess.run owns the
    # child: stop() must still end it, or it prints a lost connection after the deployment.
    fed = LocalDeployment(1, tmp_path)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, RUN_MARKER: str(tmp_path)},
    )
    try:
        fed.stop()
        assert orphan.wait(timeout=5) == -signal.SIGKILL
    finally:
        orphan.kill()
        orphan.wait()


def test_sigterm_stops_deploy_local_its_processes_and_its_key_folder(
    data_root: Path, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"  # where deploy-local makes its folder of keys and certificates
    temp.mkdir()
    command = [sys.executable, "-m", "fl_lightning.cli", "deploy-local", "configs/mnist.yaml"]
    command += ["--nodes", "1", f"data.root={data_root}", *TINY, f"output.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(temp)},
        stderr=subprocess.PIPE,
        text=True,
        # As from a shell: whatever this test process's SIGTERM disposition (Ray's driver,
        # Flower's simulation set their own), deploy-local respects an ignored one (nohup).
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    workdir = temp / "none"
    try:
        for line in proc.stderr:  # until the SuperLink and the SuperNode are up
            if "SuperNodes online" in line:
                break
        (workdir,) = temp.glob("fl-lightning-deploy-*")
        assert (workdir / "keys").is_dir() and marked_processes(str(workdir)) != []
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM
        assert rest.strip().splitlines() == [
            "fl-lightning: stopped by SIGTERM; every process it started and its temporary "
            "files are removed"
        ]
        assert marked_processes(str(workdir)) == []
        assert not workdir.exists()
    finally:  # whatever failed, leave nothing running for the next test
        proc.kill()
        proc.wait()
        for pid in marked_processes(str(workdir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie awaiting its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_processes_it_starts_die_with_it_even_if_it_is_killed(tmp_path: Path) -> None:
    # A parent that starts a child as LocalDeployment.spawn does, then is SIGKILLed.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from fl_lightning.run.processes import die_with_parent\n"
            "child = subprocess.Popen(['sleep', '300'], start_new_session=True,"
            " preexec_fn=die_with_parent())\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(300)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert die_with_parent() is not None  # Linux
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _running(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


# Installed in every process of the deployment through PYTHONPATH: records each file or
# folder opened under the watched folders, with the opening process's program name.
OPEN_RECORDER = """
import os
import sys

_WATCH = tuple(os.environ["FL_TEST_WATCH"].split(os.pathsep))
_LOG = os.environ["FL_TEST_OPEN_LOG"]


def _record(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_WATCH):
            with open(_LOG, "a") as log:
                log.write(os.path.basename(sys.argv[0]) + " " + path + "\\n")


sys.addaudithook(_record)
"""


def test_deploy_local_trains_each_supernode_on_its_own_folder_the_server_never_opens(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.user_project import config_text, write_project

    project = tmp_path / "project"
    write_project(project)
    sites = [tmp_path / "site-a", tmp_path / "site-b"]
    for site in sites:  # each site's own MNIST folder (links to the shared files)
        (site / "MNIST" / "raw").mkdir(parents=True)
        for source in (data_root / "MNIST" / "raw").iterdir():
            (site / "MNIST" / "raw" / source.name).symlink_to(source)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(OPEN_RECORDER)
    opened = tmp_path / "opened.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), str(REPO)]))
    monkeypatch.setenv("FL_TEST_WATCH", os.pathsep.join(str(s) for s in sites))
    monkeypatch.setenv("FL_TEST_OPEN_LOG", str(opened))
    monkeypatch.chdir(project)
    (project / "config.yaml").write_text(config_text())
    run = tmp_path / "run"
    args = [
        "deploy-local",
        "config.yaml",
        "--nodes",
        "2",
        # Site a also trains on 2 processes (DDP), site b on 1: each site's hardware.
        f"--node-config=data-root={json.dumps(str(sites[0]))} devices=2",
        f"--node-config=data-root={json.dumps(str(sites[1]))}",
        "federation.num_rounds=1",
        f"output.dir={run}",
    ]
    with RankWatch() as watch:
        code = main(args)
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"hits_test", "hits_val", "xent_fit"} <= set(records[-1])
    assert records[-1]["failures"] == 0 and records[-1]["rejected"] == 0
    assert (watch.most_clients, watch.most_ranks) == (1, 2)  # site a's client, 2 ranks
    readers = [line.split(" ", 1) for line in opened.read_text().splitlines()]
    for site in sites:  # each site's data was read, by client processes only
        assert any(path.startswith(str(site)) for _, path in readers), site
    # ClientApp processes (site a's DDP ranks keep their parent's argv), never the server's.
    assert {program for program, _ in readers} == {"flwr-clientapp"}, readers
    assert marked_processes() == [] and marked_processes(None, MARKER) == []
