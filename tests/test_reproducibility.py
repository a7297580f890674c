"""Same seed, same numbers: a rerun, and a killed run resumed, write the same metrics."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_lightning.config.load import load_config
from fl_lightning.server.rundir import create_run_dir
from tests.test_end_to_end import REPO, read_metrics
from tests.test_faults import simulate


def without_timings(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "seconds" and not k.startswith("time/")}
        for r in records
    ]


def test_the_same_config_twice_gives_identical_metrics(data_root: Path, tmp_path: Path) -> None:
    # Half the clients per round: which ones must not depend on Flower's random node ids.
    overrides = ["federation.fraction_train=0.5", "federation.fraction_evaluate=0.5"]
    first = read_metrics(simulate(data_root, tmp_path / "a", overrides, [], clients=4).path)
    second = read_metrics(simulate(data_root, tmp_path / "b", overrides, [], clients=4).path)
    assert [r["round"] for r in first] == [0, 1, 2]
    assert without_timings(first) == without_timings(second)


def fl_lightning(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fl_lightning.cli", "run", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the kill below takes Ray's processes with the driver
        **kwargs,
    )


def completed_round(run: Path) -> int:
    try:
        return int(torch.load(run / "checkpoints" / "resume.pt", weights_only=False)["round"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


@pytest.mark.parametrize(
    ("config", "extra", "rounds", "kill_after"),
    [
        # FedAvgM: its server momentum must survive the kill.
        ("configs/mnist.yaml", ["strategy.name=fedavgm"], 4, 2),
        # DP-SGD: the clients' accountants and the server's ledger must survive it. DP noise
        # repeats only when the run opts into seeded noise (secret by default).
        (
            "configs/mnist_dp_sgd.yaml",
            ["data.batch_size=64", "privacy.reproducible_noise=true"],
            2,
            1,
        ),
        # Client-level DP: the server's noise, seeded by (seed, round) on request.
        (
            "configs/mnist.yaml",
            [
                "privacy.mode=client_dp",
                "privacy.noise_multiplier=0.3",
                "privacy.reproducible_noise=true",
            ],
            2,
            1,
        ),
    ],
    ids=["fedavgm", "dp_sgd", "client_dp"],
)
def test_a_killed_run_resumes_to_the_same_result(
    config: str, extra: list[str], rounds: int, kill_after: int, data_root: Path, tmp_path: Path
) -> None:
    args = [
        config,
        f"data.root={data_root}",
        "data.max_train_samples=300",
        "data.max_test_samples=200",
        "federation.num_clients=2",
        f"federation.num_rounds={rounds}",
        "trainer.max_epochs=1",
        *extra,
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert fl_lightning(*args, f"output.dir={full}").wait(timeout=600) == 0

    proc = fl_lightning(*args, f"output.dir={killed}")
    deadline = time.monotonic() + 600
    while (
        completed_round(killed) < kill_after and time.monotonic() < deadline and proc.poll() is None
    ):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert kill_after <= completed_round(killed) < rounds  # killed mid-run

    resumed = fl_lightning(*args, f"output.dir={killed}", "--resume", str(killed))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    assert [r["round"] for r in read_metrics(killed)] == list(range(rounds + 1))
    assert without_timings(read_metrics(killed)) == without_timings(read_metrics(full))


def test_resume_refuses_a_run_of_another_config(data_root: Path, tmp_path: Path) -> None:
    # A run directory as `run` leaves it (config.yaml, a round in metrics.jsonl).
    run = create_run_dir(load_config("configs/mnist.yaml", [f"output.dir={tmp_path / 'run'}"]))
    run.metrics.write_text('{"round": 0}\n')
    before = run.metrics.read_text()
    proc = fl_lightning(
        "configs/mnist.yaml",
        f"data.root={data_root}",
        "optimizer.lr=0.5",
        "--resume",
        str(run.path),
    )
    assert proc.wait(timeout=120) == 2
    error = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert error.startswith("error: --resume:") and "another config" in error
    assert run.metrics.read_text() == before  # nothing touched
