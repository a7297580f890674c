import json
from pathlib import Path

from fl_lightning.rundir import RunDir
from fl_lightning.tracking import RunTracker, jsonl_key


def test_rounds_go_to_jsonl_and_summary(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    tracker = RunTracker(
        run, num_rounds=2, hparams={"seed": 1, "data": {"root": "x"}}, console=False
    )
    tracker.log_round(0, {"centralized/loss": 2.3, "centralized/accuracy": 0.1, "seconds": 1.0})
    for r in (1, 2):
        tracker.log_round(
            r,
            {
                "train/loss": 1.0 / r,
                "distributed/loss": 0.5 / r,
                "distributed/accuracy": 0.9,
                "centralized/loss": 0.4 / r,
                "centralized/accuracy": 0.95 + r / 100,
                "seconds": 2.0,
            },
        )
    tracker.close()
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[2]["centralized_accuracy"] == 0.97
    assert set(records[1]) == {
        "round",
        "train_loss",
        "distributed_loss",
        "distributed_accuracy",
        "centralized_loss",
        "centralized_accuracy",
        "seconds",
    }
    assert run.last_round() == 2
    summary = run.summary.read_text()
    assert "| Metric | Round 1 | Round 2 |" in summary
    assert "| Accuracy (Centralized) | 96.00% | 97.00% |" in summary
    assert "| Distributed Loss | 0.5000 | 0.2500 |" in summary


def test_jsonl_keys_spell_tags_with_underscores() -> None:
    assert jsonl_key("centralized/accuracy") == "centralized_accuracy"


def test_last_round_of_an_empty_run_is_minus_one(tmp_path: Path) -> None:
    assert RunDir(tmp_path).last_round() == -1
