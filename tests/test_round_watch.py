"""federation.early_stopping and output.best_checkpoint: watching a round metric."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.errors import ConfigError, EarlyStopped, RoundCloseError
from fl_lightning.server.round_watch import RoundWatch
from tests.test_round_close import recorder_for

WATCHED = [
    "federation.early_stopping.monitor=test/loss",
    "federation.early_stopping.patience=2",
    "output.best_checkpoint.monitor=test/accuracy",
    "output.best_checkpoint.mode=max",
]


def watch_of(*overrides: str) -> RoundWatch:
    return RoundWatch(load_config("configs/mnist.yaml", list(overrides)))


def test_early_stopping_ends_patience_rounds_after_the_best_round() -> None:
    watch = watch_of(*WATCHED, "federation.early_stopping.min_delta=0.05")
    losses = {1: 1.0, 2: 0.5, 3: 0.48, 4: 0.6}  # 3 improves by less than min_delta
    for server_round, loss in losses.items():
        watch.update(server_round, {"test/loss": loss})
        assert (watch.stop_reason is not None) == (server_round == 4)
    assert "after round 2" in str(watch.stop_reason)


def test_rounds_without_the_value_change_nothing() -> None:
    watch = watch_of(*WATCHED)
    assert watch.update(1, {"test/accuracy": 0.5, "test/loss": 1.0})
    for server_round in (2, 3, 4, 5):  # rounds the server did not test (every_n_rounds)
        assert not watch.update(server_round, {"train/loss": 0.1})
    assert watch.stop_reason is None  # patience counts rounds that measured the metric
    assert not watch.update(6, {"test/accuracy": float("nan"), "test/loss": float("nan")})
    assert watch.best is not None and watch.best.round == 1
    assert watch.stop_reason is None  # one round without an improvement: a NaN is none
    assert not watch.update(7, {"test/accuracy": 0.4, "test/loss": 1.2})
    assert watch.stop_reason is not None


def test_an_unknown_metric_fails_after_round_1_with_the_names_that_exist() -> None:
    watch = watch_of("output.best_checkpoint.monitor=test/acc")
    history = {0: {"test/accuracy": 0.1}, 1: {"train/loss": 1.0, "time/aggregation": 0.1}}
    with pytest.raises(RoundCloseError, match=r"'test/acc' is not a round metric; the rounds "
                       r"log test/accuracy, train/loss; name one"):  # fmt: skip
        watch.check_names(history)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.early_stopping.patience=0", "federation.early_stopping.patience"),
        ("federation.early_stopping.min_delta=-1", "federation.early_stopping.min_delta"),
        ("output.best_checkpoint.mode=up", "output.best_checkpoint.mode"),
    ],
)
def test_bad_settings_fail_at_load(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config("configs/mnist.yaml", [override])


@pytest.fixture()
def cfg(data_root: Path) -> Config:
    return load_config(
        "configs/mnist.yaml",
        [
            f"data.root={data_root}",
            "data.max_test_samples=200",
            "federation.early_stopping.monitor=train/loss",
            "federation.early_stopping.patience=2",
            "output.best_checkpoint.monitor=train/loss",
        ],
    )


def test_best_ckpt_holds_the_best_rounds_weights_and_the_run_stops_after_patience(
    cfg: Config, tmp_path: Path
) -> None:
    recorder, run = recorder_for(cfg, tmp_path)
    template = recorder.evaluator.model.state_dict()
    weights = [{k: torch.randn_like(v) for k, v in template.items()} for _ in range(5)]
    losses = [9.0, 1.0, 0.5, 0.7, 0.6]  # round 2 is the best
    for server_round, loss in enumerate(losses):
        recorder.watch.raise_if_stopped()
        recorder.start()
        recorder.add({"train/loss": loss})
        recorder.close(server_round, weights[server_round])
    saved = torch.load(run.checkpoint("best"), weights_only=True)["state_dict"]
    assert all(saved[k].equal(weights[2][k]) for k in template)
    with pytest.raises(EarlyStopped, match="after round 2"):
        recorder.watch.raise_if_stopped()  # round 5 does not start
    recorder.shutdown()
    recorder.tracker.close()

    # --resume: the watch replays the history, so the resumed run decides the same, and
    # best.ckpt is the best round's again, whatever the killed run copied there last.
    shutil.copyfile(run.checkpoint("round_4"), run.checkpoint("best"))
    resumed, _ = recorder_for(cfg, tmp_path / "resumed")
    resumed.watch.replay(recorder.tracker.history, run)
    assert resumed.watch.best is not None and resumed.watch.best.round == 2
    assert resumed.watch.stop_reason == recorder.watch.stop_reason
    saved = torch.load(run.checkpoint("best"), weights_only=True)["state_dict"]
    assert all(saved[k].equal(weights[2][k]) for k in template)
    resumed.shutdown()
    resumed.tracker.close()


def test_names_are_checked_after_the_first_round_that_trained(cfg: Config, tmp_path: Path) -> None:
    recorder, _ = recorder_for(cfg, tmp_path)
    weights = recorder.evaluator.model.state_dict()
    recorder.start()
    recorder.add({"test/loss": 2.0})
    recorder.close(0, weights)
    recorder.start()  # round 1: every client failed, nothing trained
    recorder.close(1, weights)
    recorder.start()
    recorder.add({"test/loss": 1.0})
    with pytest.raises(RoundCloseError, match=r"'train/loss' is not a round metric"):
        recorder.add({"val/loss": 1.0})
        recorder.close(2, weights)
    recorder.shutdown()
    recorder.tracker.close()
