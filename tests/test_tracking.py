import json
from pathlib import Path

from fl_lightning.server.rundir import RunDir
from fl_lightning.server.tracking import RunTracker


def test_rounds_go_to_jsonl_and_summary(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    tracker = RunTracker(
        run, num_rounds=2, hparams={"seed": 1, "data": {"root": "x"}}, console=False
    )
    tracker.log_round(0, {"test/loss": 2.3, "test/accuracy": 0.1, "seconds": 1.0})
    for r in (1, 2):
        tracker.log_round(
            r,
            {
                "train/loss": 1.0 / r,
                "val/loss": 0.5 / r,
                "val/accuracy": 0.9,
                "test/loss": 0.4 / r,
                "test/accuracy": 0.95 + r / 100,
                "seconds": 2.0,
            },
        )
    tracker.close()
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[2]["test/accuracy"] == 0.97
    assert set(records[1]) == {
        "round",
        "train/loss",
        "val/loss",
        "val/accuracy",
        "test/loss",
        "test/accuracy",
        "seconds",
    }
    assert run.last_round() == 2
    summary = run.summary.read_text()
    assert "| Metric | Round 1 | Round 2 |" in summary
    assert "| test/accuracy | 96.00% | 97.00% |" in summary
    assert "| val/loss | 0.5000 | 0.2500 |" in summary
    assert "| seconds |" not in summary  # bookkeeping, not a metric of the module
    assert "Initial model (centralized): test/loss 2.3000, test/accuracy 10.00%." in summary


def test_a_modules_own_metric_names_reach_every_sink(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    tracker = RunTracker(run, num_rounds=1, hparams={}, console=False)
    tracker.log_round(0, {"test_f1": 0.2, "seconds": 1.0})
    tracker.log_round(1, {"train_mse": 0.7, "val_f1": 0.5, "test_f1": 0.6, "failures": 0})
    tracker.close()
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    expected = {"round": 1, "train_mse": 0.7, "val_f1": 0.5, "test_f1": 0.6, "failures": 0}
    assert records[1] == expected
    summary = run.summary.read_text()
    for row in ("| train_mse | 0.7000 |", "| val_f1 | 0.5000 |", "| test_f1 | 0.6000 |"):
        assert row in summary
    assert run.curves.exists()


def test_last_round_of_an_empty_run_is_minus_one(tmp_path: Path) -> None:
    assert RunDir(tmp_path).last_round() == -1
