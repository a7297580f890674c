"""A real Flower simulation (Ray, 2 clients, 1 round) through the console entry point."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_lightning.models.networks import MNISTNet

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per round."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_simulation_writes_the_run_directory(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"  # tiny_overrides' output.dir
    noisy_client = ["data.noise.clients=[1]", "data.noise.std=0.3", "output.client_report=true"]
    command = ["fl_lightning.cli", "run", "configs/mnist.yaml", *tiny_overrides, *noisy_client]
    result = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

    records = read_metrics(run)
    assert [r["round"] for r in records] == [0, 1]
    final = records[1]
    for key in (
        "test/loss",
        "test/accuracy",
        "val/loss",
        "val/accuracy",
        "train/loss",
        "seconds",
        "time/client_training",
        "time/aggregation",
        "time/client_evaluation",
        "time/centralized_evaluation",
        "time/checkpoint",
    ):
        assert isinstance(final[key], float), key
    # The server's phases (`time/<phase>`) add up to the round; `time/clients/*` overlap them.
    phases = sum(v for k, v in final.items() if re.fullmatch(r"time/[a-z_]+", k))
    assert phases == pytest.approx(final["seconds"], abs=0.05)
    assert 0.0 <= final["test/accuracy"] <= 1.0
    assert final["test/loss"] < records[0]["test/loss"]  # one round of training helps

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "test/loss",
        "test/accuracy",
        "val/loss",
        "val/accuracy",
        "train/loss",
    } <= tags
    assert [e.step for e in events.Scalars("test/accuracy")] == [0, 1]
    assert abs(events.Scalars("test/accuracy")[-1].value - final["test/accuracy"]) < 1e-6

    model = MNISTNet.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert (model.hparams.optimizer, model.hparams.lr) == ("sgd", 0.05)  # configs/mnist.yaml
    round_1 = torch.load(run / "checkpoints" / "round_1.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in round_1.items())
    assert yaml.safe_load((run / "config.yaml").read_text())["federation"]["num_rounds"] == 1
    summary = (run / "summary.md").read_text()
    assert "| test/accuracy |" in summary
    assert "![metrics per round](curves.png)" in summary
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")

    histogram = json.loads((run / "label_histogram.json").read_text())
    assert len(histogram["counts"]) == 2 and sum(map(sum, histogram["counts"])) == 270
    assert (run / "label_histogram.png").exists()
    assert "data/label_histogram" in events.Tags()["images"]

    clients = json.loads((run / "clients.json").read_text())
    assert [(c["client"], c["noisy"]) for c in clients] == [(0, False), (1, True)]
    for client in clients:
        assert 0.0 <= client["before_fl_accuracy"] <= 1.0
        assert 0.0 <= client["after_fl_accuracy"] <= 1.0
    assert clients[0]["after_fl_accuracy"] == pytest.approx(final["test/accuracy"], abs=1e-6)
    assert "| 1 | noisy |" in summary
    assert "round 1/1" in result.stderr + result.stdout
