"""`output.client_logs`: a client's own Lightning logging, one TensorBoard run per client."""

import dataclasses
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_lightning.client import training
from fl_lightning.client.logs import client_log_dir
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.errors import ClientError, ConfigError
from tests.test_config import MNIST
from tests.test_training import initial_state


def with_client_logs(cfg: Config, output_dir: str | None) -> Config:
    output = dataclasses.replace(cfg.output, client_logs=True, dir=output_dir)
    return dataclasses.replace(cfg, output=output)


def steps(log_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_clients_steps_continue_across_rounds_in_its_own_run(
    tiny_mnist: Config, tmp_path: Path
) -> None:
    cfg = with_client_logs(tiny_mnist, str(tmp_path / "run"))
    state = initial_state(cfg)
    for server_round in (1, 2, 4):  # the client sat round 3 out
        training.fit(cfg, state, partition_id=1, num_partitions=2, server_round=server_round)
    per_round = -(-135 // cfg.data.batch_size)  # 135 examples; the last batch is partial
    log_dir = tmp_path / "run" / "tensorboard" / "clients" / "1"
    assert log_dir == client_log_dir(cfg.output.dir, 1)
    # The module logs train/loss once an epoch, at the epoch's last step.
    assert steps(log_dir, "train/loss") == [per_round - 1, 2 * per_round - 1, 4 * per_round - 1]
    assert not (tmp_path / "run" / "tensorboard" / "clients" / "0").exists()


def test_client_logs_off_writes_nothing(tiny_mnist: Config, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        tiny_mnist, output=dataclasses.replace(tiny_mnist.output, dir=str(tmp_path))
    )
    training.fit(cfg, initial_state(cfg), partition_id=0, num_partitions=2, server_round=1)
    assert list(tmp_path.iterdir()) == []


def test_a_client_that_does_not_know_the_run_directory_says_so(tiny_mnist: Config) -> None:
    cfg = with_client_logs(tiny_mnist, None)
    with pytest.raises(ClientError, match=r"output.client_logs: output.dir is not set"):
        training.fit(cfg, initial_state(cfg), partition_id=0, num_partitions=2, server_round=1)


LR_MONITOR = "{class_path: lightning.pytorch.callbacks.LearningRateMonitor}"


def test_a_callback_that_needs_a_logger_logs_into_the_clients_run(
    tmp_path: Path, data_root: Path
) -> None:
    overrides = [f"data.root={data_root}", f"trainer.callbacks=[{LR_MONITOR}]"]
    with pytest.raises(ConfigError, match=r"set output.client_logs=true"):
        load_config(MNIST, overrides)
    cfg = load_config(
        MNIST,
        [
            *overrides,
            "output.client_logs=true",
            f"output.dir={tmp_path / 'run'}",
            "data.max_train_samples=300",
            "federation.num_clients=2",
        ],
    )
    for server_round in (1, 2):
        training.fit(
            cfg, initial_state(cfg), partition_id=0, num_partitions=2, server_round=server_round
        )
    lr_steps = steps(client_log_dir(cfg.output.dir, 0), "lr-SGD")
    assert lr_steps == sorted(set(lr_steps)) and len(lr_steps) >= 2  # both rounds, in order
