"""Round closes: in order, with what the round handed over, in the background or not."""

import dataclasses
import json
import os
import threading
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.errors import RoundCloseError
from fl_lightning.server import resume
from fl_lightning.server.evaluation import CentralEvaluator
from fl_lightning.server.reply_screen import ReplyScreen
from fl_lightning.server.resume_state import resume_path
from fl_lightning.server.round_close import RoundRecorder
from fl_lightning.server.rundir import RunDir, create_run_dir
from fl_lightning.server.tracking import RunTracker
from tests.test_strategy import census


@pytest.fixture()
def cfg(data_root: Path) -> Config:
    return load_config(
        "configs/mnist.yaml", [f"data.root={data_root}", "data.max_test_samples=200"]
    )


def recorder_for(cfg: Config, path: Path) -> tuple[RoundRecorder, RunDir]:
    run = RunDir(path)
    tracker = RunTracker(run, num_rounds=3, hparams={}, console=False)
    return RoundRecorder(CentralEvaluator(cfg), tracker, run), run


def records(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics.read_text().splitlines()]


def test_background_closes_write_each_round_as_handed_over_and_in_order(
    cfg: Config, tmp_path: Path
) -> None:
    recorder, run = recorder_for(cfg, tmp_path)
    weights = [
        {k: torch.randn_like(v) for k, v in recorder.evaluator.model.state_dict().items()}
        for _ in range(3)
    ]
    handed_over = [{k: v.clone() for k, v in w.items()} for w in weights]
    for server_round in (0, 1):
        recorder.start()
        recorder.add({"train/loss": float(server_round)})
        recorder.close_in_background(server_round, weights[server_round])
        # The next round goes on at once and changes what the recorder holds.
        recorder.start()
        recorder.add({"train/loss": 99.0})
        for tensor in weights[server_round].values():
            tensor.zero_()
    recorder.start()
    recorder.add({"train/loss": 2.0})
    final = recorder.close(2, weights[2])  # waits for rounds 0 and 1 first
    recorder.shutdown()
    recorder.tracker.close()

    logged = records(run)
    assert [r["round"] for r in logged] == [0, 1, 2]
    assert [r["train/loss"] for r in logged] == [0.0, 1.0, 2.0]  # not 99: copied at hand-over
    assert final["test/accuracy"] == logged[2]["test/accuracy"]
    for server_round in (0, 1, 2):
        saved = torch.load(run.checkpoint(f"round_{server_round}"), weights_only=True)
        for key, tensor in handed_over[server_round].items():
            assert saved["state_dict"][key].equal(tensor), key
    assert run.checkpoint("last").exists()
    resumable = torch.load(resume_path(run), weights_only=False)
    assert resumable["round"] == 2 and sorted(resumable["history"]) == [0, 1, 2]


def test_background_closes_evaluate_at_idle_priority_with_the_servers_threads(
    cfg: Config, tmp_path: Path
) -> None:
    recorder, _ = recorder_for(cfg, tmp_path)
    seen: list[tuple[int, int, str]] = []
    evaluate = recorder.evaluator.evaluate

    def spy(state_dict: dict[str, torch.Tensor], noisy: bool = False) -> dict[str, float]:
        policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else -1
        seen.append((policy, torch.get_num_threads(), threading.current_thread().name))
        return evaluate(state_dict, noisy)

    recorder.evaluator.evaluate = spy  # type: ignore[method-assign]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the server's thread uses, whatever OpenMP's default
    recorder.close_in_background(0, recorder.evaluator.model.state_dict())
    recorder.close(1, recorder.evaluator.model.state_dict())
    recorder.shutdown()
    recorder.tracker.close()
    torch.set_num_threads(threads)

    (policy, background_threads, name), (_, foreground_threads, main) = seen
    assert name.startswith("round-close") and main == threading.current_thread().name
    assert background_threads == foreground_threads == 1
    if hasattr(os, "SCHED_IDLE"):
        assert policy == os.SCHED_IDLE


def test_a_failed_background_close_is_raised_by_wait(cfg: Config, tmp_path: Path) -> None:
    recorder, _ = recorder_for(cfg, tmp_path)
    recorder.close_in_background(0, {"not.a.weight": torch.zeros(1)})
    with pytest.raises(
        RoundCloseError,
        match=r"^round 0 could not be closed: the centralized evaluation failed "
        r"\(RuntimeError: .*not\.a\.weight",
    ) as err:
        recorder.wait()
    assert "\n" not in str(err.value)
    recorder.shutdown()
    recorder.tracker.close()


def test_a_failed_background_write_stops_the_run_at_the_next_rounds_start(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, run = recorder_for(cfg, tmp_path)
    recorder.start()
    recorder.close_in_background(0, recorder.evaluator.model.state_dict())
    recorder.wait()
    (checkpoint,) = run.path.glob("checkpoints/round_0.ckpt")

    def disk_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)  # what Lightning's checkpoint writer calls
    recorder.start()
    recorder.close_in_background(1, recorder.evaluator.model.state_dict())
    (closing,) = recorder._pending
    futures.wait([closing])
    # Round 2 is stopped as it starts, in one line naming the round and what failed.
    with pytest.raises(
        RoundCloseError,
        match=r"^round 1 could not be closed: writing its checkpoints failed "
        r"\(OSError: \[Errno 28\] No space left on device\)",
    ):
        recorder.start()
    recorder.shutdown()  # said once: nothing left to raise
    recorder.tracker.close()
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [
        "last.ckpt",
        "resume.pt",
        "round_0.ckpt",
    ]  # no temporary file left behind
    assert [r["round"] for r in records(run)] == [0]


def test_the_wait_for_background_closes_is_timed_as_the_evaluation_backlog(
    cfg: Config, tmp_path: Path
) -> None:
    recorder, run = recorder_for(cfg, tmp_path)
    evaluate = recorder.evaluator.evaluate
    release = threading.Event()

    def slow(state_dict: dict[str, torch.Tensor], noisy: bool = False) -> dict[str, float]:
        release.wait(timeout=10)
        return evaluate(state_dict, noisy)

    recorder.evaluator.evaluate = slow  # type: ignore[method-assign]
    recorder.start()
    recorder.close_in_background(0, recorder.evaluator.model.state_dict())
    recorder.start()
    # Round 1 ends while round 0 is still being evaluated; it is released 0.5 s later.
    threading.Timer(0.5, release.set).start()
    recorder.close(1, recorder.evaluator.model.state_dict())
    recorder.shutdown()
    recorder.tracker.close()

    background, last = records(run)
    assert "time/evaluation_backlog" not in background
    assert 0.45 <= last["time/evaluation_backlog"] <= last["seconds"]
    assert last["time/between"] < 0.2


def test_each_clients_metrics_and_their_spread_are_logged_but_not_shown(
    cfg: Config, tmp_path: Path
) -> None:
    recorder, run = recorder_for(cfg, tmp_path)
    recorder.start()
    recorder.add({"val/accuracy": 0.7}, source="distributed")
    recorder.add_clients({3: {"val/accuracy": 0.9}, 0: {"val/accuracy": 0.4}})
    recorder.close(1, recorder.evaluator.model.state_dict())
    recorder.shutdown()
    recorder.tracker.close()
    (record,) = records(run)
    assert (record["clients/0/val/accuracy"], record["clients/3/val/accuracy"]) == (0.4, 0.9)
    spread = [record[f"clients/{s}/val/accuracy"] for s in ("min", "mean", "max")]
    assert spread == pytest.approx([0.4, 0.65, 0.9])
    assert "clients/" not in run.summary.read_text()  # TensorBoard and metrics.jsonl only


def test_a_name_logged_in_two_stages_is_kept_apart(cfg: Config, tmp_path: Path) -> None:
    recorder, run = recorder_for(cfg, tmp_path)
    recorder.start()
    recorder.add({"loss": 1.0}, source="train")
    recorder.add({"loss": 2.0}, source="distributed")
    recorder.close(1, recorder.evaluator.model.state_dict())
    recorder.shutdown()
    recorder.tracker.close()
    (record,) = records(run)
    assert (record["loss"], record["distributed/loss"]) == (1.0, 2.0)


def test_a_name_the_server_tests_under_keeps_it_in_every_round(cfg: Config, tmp_path: Path) -> None:
    recorder, run = recorder_for(cfg, tmp_path)
    weights = recorder.evaluator.model.state_dict()
    recorder.start()
    recorder.close(0, weights)  # the initial evaluation: test/loss, test/accuracy
    for server_round in (1, 2):
        recorder.start()
        if server_round == 2:  # a client logging the test metric's name in training too
            recorder.add({"test/loss": 5.0}, source="train")
        recorder.add({"val/loss": 1.0}, source="distributed")
        recorder.close(server_round, weights)
    recorder.shutdown()
    recorder.tracker.close()
    logged = records(run)
    assert all(isinstance(r["test/loss"], float) and r["test/loss"] != 5.0 for r in logged)
    assert logged[2]["train/test/loss"] == 5.0 and "val/loss" in logged[1]


def test_a_resumed_run_names_each_metric_as_the_run_it_continues(
    cfg: Config, tmp_path: Path
) -> None:
    def rounds(recorder: RoundRecorder, numbers: range, screen: ReplyScreen | None = None) -> None:
        weights = recorder.evaluator.model.state_dict()
        for server_round in numbers:
            recorder.start()
            if server_round == 1:  # round 2 adopts no update: it has no training metrics
                recorder.add({"loss": 1.0}, source="train")
            recorder.add({"loss": 2.0}, source="distributed")
            resumable = ({}, screen.state()) if screen is not None else None
            recorder.close(server_round, weights, resumable)
        recorder.shutdown()
        recorder.tracker.close()

    full, full_run = recorder_for(cfg, tmp_path / "full")
    rounds(full, range(1, 3))
    # The same run killed after round 1: what resume.pt keeps, read back as --resume reads it.
    cfg = replace(cfg, output=replace(cfg.output, dir=str(tmp_path / "killed")))
    killed = create_run_dir(cfg)
    first = RoundRecorder(full.evaluator, RunTracker(killed, 2, {}, console=False), killed)
    screen = ReplyScreen(cfg, census(cfg.federation.num_clients))
    agreed = {"agreed": {"train": ["loss"]}, "votes": {"train": {0: ["loss"], 1: ["loss"]}}}
    screen.load_state(agreed)
    rounds(first, range(1, 2), screen)
    _, state = resume.load(cfg, killed.path)
    assert state.screened == agreed
    resumed, resumed_run = recorder_for(cfg, tmp_path / "resumed")
    resumed.load_logged_names(state.logged)
    rounds(resumed, range(2, 3))

    # Training logged `loss` in round 1: the clients' validation loss is kept apart after it.
    expected = records(full_run)[1]
    assert expected["distributed/loss"] == 2.0 and "loss" not in expected
    (record,) = records(resumed_run)
    assert {k for k in record if not k.startswith("time/")} == {
        k for k in expected if not k.startswith("time/")
    }


def test_the_server_tests_every_nth_round_and_the_last(cfg: Config, tmp_path: Path) -> None:
    cfg = replace(
        cfg,
        federation=replace(cfg.federation, num_rounds=5),
        evaluation=replace(cfg.evaluation, every_n_rounds=2),
    )
    recorder, run = recorder_for(cfg, tmp_path)
    weights = [
        {k: torch.randn_like(v) for k, v in recorder.evaluator.model.state_dict().items()}
        for _ in range(6)
    ]
    for server_round in range(6):
        recorder.start()
        recorder.add({"val/loss": 1.0}, source="distributed")
        recorder.close_in_background(server_round, weights[server_round])
    recorder.shutdown()
    recorder.tracker.close()
    logged = records(run)
    assert [r["round"] for r in logged] == list(range(6))
    assert [r for r in range(6) if "test/accuracy" in logged[r]] == [0, 2, 4, 5]
    assert all("val/loss" in r for r in logged[1:])
    # A round left untested still checkpoints its own model.
    saved = torch.load(run.checkpoint("round_3"), weights_only=True)["state_dict"]
    assert all(saved[k].equal(v) for k, v in weights[3].items())


def test_the_server_tests_a_seeded_subset_of_max_samples(cfg: Config) -> None:
    capped = replace(cfg, evaluation=replace(cfg.evaluation, max_samples=50))
    first, again = CentralEvaluator(capped), CentralEvaluator(capped)
    assert len(first.loader.dataset) == len(first.noisy_loader.dataset) == 50
    assert first.loader.dataset.indices == again.loader.dataset.indices  # type: ignore[attr-defined]
    assert first.loader.dataset.indices != list(range(50))  # type: ignore[attr-defined]
    assert len(CentralEvaluator(cfg).loader.dataset) == 200  # data.max_test_samples alone


def test_with_client_state_at_most_one_round_closes_in_the_background(
    cfg: Config, tmp_path: Path
) -> None:
    # Clients keep their last three rounds' state: resume.pt may lag by one round only.
    stateful = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, stateful_clients=True)
    )
    recorder, _ = recorder_for(stateful, tmp_path)
    for server_round in (0, 1, 2):
        recorder.start()
        recorder.add({"train/loss": 1.0})
        recorder.close_in_background(server_round, recorder.evaluator.model.state_dict())
        assert len(recorder._pending) == 1  # the rounds before it are written
    recorder.wait()
    recorder.shutdown()
    recorder.tracker.close()
