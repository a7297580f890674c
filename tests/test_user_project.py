"""A user's own LightningModule, DataModule and callback, federated from a folder outside the
package by `fl-lightning run`, under every privacy mode and SecAgg+."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.user_project import (
    TEST_METRICS,
    TRAIN_METRICS,
    VAL_METRICS,
    config_text,
    write_project,
)

RUNS = {
    "fedavg": ("Digits", []),
    "fedprox": ("SiteDigits", ["strategy.name=fedprox", "strategy.proximal_mu=0.1"]),
    "dp_sgd": ("Digits", ["privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0"]),
    "client_dp": ("Digits", ["privacy.mode=client_dp", "privacy.noise_multiplier=0.5"]),
    "secagg": ("Digits", ["secure_aggregation.enabled=true", "secure_aggregation.num_shares=3"]),
}


def run_cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`fl-lightning ARGS` in the user's project folder, as a user runs it."""
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    command = [sys.executable, "-m", "fl_lightning.cli", *args]
    return subprocess.run(
        command, cwd=project, capture_output=True, text=True, env=env, timeout=900
    )


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
    expected = (TRAIN_METRICS if mode != "secagg" else set()) | VAL_METRICS | TEST_METRICS
    assert expected <= set(final), sorted(final)
    assert not {k for k in final if k.startswith(("centralized", "distributed"))}
    assert set(records[0]) >= TEST_METRICS  # the initial model, evaluated centrally
    if mode != "secagg":
        assert final["epochs_seen"] == 1.0  # the user's callback ran

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    summary = (run / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in expected)

    sys.path.insert(0, str(tmp_path))
    try:
        core = importlib.import_module("lit_digits.core")
        model = core.LitDigits.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    finally:
        sys.path.remove(str(tmp_path))
    assert model.hparams.hidden == 16  # the user's class, with the config's init_args
