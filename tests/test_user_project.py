"""A user's own LightningModule, DataModule and callback, federated from a folder outside the
package by `fl-lightning run`, under every privacy mode and SecAgg+."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_end_to_end import read_metrics
from tests.test_reproducibility import completed_round, without_timings
from tests.user_project import (
    TEST_METRICS,
    TRAIN_METRICS,
    VAL_METRICS,
    config_text,
    write_project,
)

RUNS = {
    "fedavg": ("Digits", ["output.client_logs=true", "trainer.log_every_n_steps=1"]),
    "fedprox": ("SiteDigits", ["strategy.name=fedprox", "strategy.proximal_mu=0.1"]),
    "dp_sgd": ("Digits", ["privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0"]),
    "client_dp": ("Digits", ["privacy.mode=client_dp", "privacy.noise_multiplier=0.5"]),
    "secagg": ("Digits", ["secure_aggregation.enabled=true", "secure_aggregation.num_shares=3"]),
    # Its sites hold validation data of their own (val_dataloader), with val_fraction 0:
    # SecAgg+ evaluates on it by the same rule as the plain path (`evaluation_fraction`).
    "secagg_sites": (
        "SiteDigits",
        [
            "secure_aggregation.enabled=true",
            "secure_aggregation.num_shares=3",
            "data.val_fraction=0",
        ],
    ),
}
SECURE = ("secagg", "secagg_sites")


def run_cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`fl-lightning ARGS` in the user's project folder, as a user runs it."""
    return subprocess.run(
        _command(*args), cwd=project, capture_output=True, text=True, env=_env(), timeout=900
    )


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fl_lightning.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def load_users_module(project: Path, checkpoint: Path) -> torch.nn.Module:
    """The checkpoint, loaded with the user's own class from the project folder."""
    sys.path.insert(0, str(project))
    try:
        core = importlib.import_module("lit_digits.core")
        return core.LitDigits.load_from_checkpoint(checkpoint)
    finally:
        sys.path.remove(str(project))


@pytest.mark.parametrize("mode", RUNS)
def test_a_users_project_federates_with_its_own_metric_names(
    mode: str, tmp_path: Path, data_root: Path
) -> None:
    datamodule, overrides = RUNS[mode]
    write_project(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(config_text(datamodule))
    run = tmp_path / "run"
    result = run_cli(tmp_path, "run", str(config), f"output.dir={run}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    # SecAgg+ clients send no training metrics in the clear.
    expected = (TRAIN_METRICS if mode not in SECURE else set()) | VAL_METRICS | TEST_METRICS
    assert expected <= set(final), sorted(final)
    assert not {k for k in final if k.startswith(("centralized", "distributed"))}
    assert set(records[0]) >= TEST_METRICS  # the initial model, evaluated centrally
    if mode not in SECURE:
        assert final["epochs_seen"] == 1.0  # the user's callback ran

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    if mode == "fedavg":  # output.client_logs: each client's own per-step logging
        for client in range(3):
            own = EventAccumulator(str(run / "tensorboard" / "clients" / str(client)))
            own.Reload()
            assert {"xent_fit_step", "xent_fit_epoch"} <= set(own.Tags()["scalars"])
    summary = (run / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in expected)

    model = load_users_module(tmp_path, run / "checkpoints" / "last.ckpt")
    assert model.hparams.hidden == 16  # the user's class, with the config's init_args


def test_a_killed_users_run_resumes_to_the_same_result(tmp_path: Path, data_root: Path) -> None:
    write_project(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(config_text("Digits"))
    # Rounds of a fraction of a second: a few more leave the kill time to land mid-run.
    rounds = 5
    args = ["run", str(config), "federation.num_clients=2", f"federation.num_rounds={rounds}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = run_cli(tmp_path, *args, f"output.dir={full}")
    assert result.returncode == 0, result.stderr[-3000:]

    proc = subprocess.Popen(
        _command(*args, f"output.dir={killed}"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the kill below takes Ray's processes with the driver
    )
    deadline = time.monotonic() + 600
    while completed_round(killed) < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= completed_round(killed) < rounds  # killed mid-run

    result = run_cli(tmp_path, *args, f"output.dir={killed}", "--resume", str(killed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["round"] for r in read_metrics(killed)] == list(range(rounds + 1))
    assert without_timings(read_metrics(killed)) == without_timings(read_metrics(full))
    models = [
        load_users_module(tmp_path, run / "checkpoints" / "last.ckpt") for run in (full, killed)
    ]
    assert models[1].hparams == models[0].hparams and models[1].hparams.hidden == 16
    weights = [model.state_dict() for model in models]
    assert all(torch.equal(weights[1][k], weights[0][k]) for k in weights[0])
