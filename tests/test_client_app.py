"""The module-level ClientApp (what `flwr run .` and SuperNodes load) on real messages."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_lightning.client_app import app
from fl_lightning.config.node_config import config_from_run_config
from fl_lightning.config.schema import Config
from fl_lightning.models.build import build_model
from fl_lightning.server.batchnorm import BATCHNORM_MESSAGE_TYPE
from fl_lightning.server.census import CENSUS_MESSAGE_TYPE, Census, Known, census_problem
from fl_lightning.server.reply_screen import EVALUATE, TRAIN, ReplyScreen
from fl_lightning.vocabulary import FIT_SECONDS, SETUP_SECONDS, UNIFORM_WEIGHT


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the process's task identity, which a runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def context_for(data_root: Path, partition_id: int) -> Context:
    overrides = (
        f"data.root={data_root} data.max_train_samples=300 data.max_test_samples=200 "
        "federation.num_clients=2"
    )
    return Context(
        run_id=1,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(),
        run_config={"config-path": "configs/mnist.yaml", "overrides": overrides},
    )


def message(cfg: Config, message_type: str, num_classes: int = 10) -> Message:
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(cfg, num_classes).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=1, message_type=message_type)


def test_train_handler_replies_with_weights_and_metrics(
    tiny_mnist: Config, data_root: Path
) -> None:
    reply = app(message(tiny_mnist, MessageType.TRAIN), context_for(data_root, 0))
    assert not reply.has_error(), reply.error
    arrays = reply.content.array_records["arrays"]
    assert set(arrays.keys()) == set(build_model(tiny_mnist, 10).state_dict().keys())
    metrics = reply.content.metric_records["metrics"]
    # configs/mnist.yaml trains 2 local epochs on 135 samples (150 minus 10% validation)
    assert metrics["num-examples"] == 135
    assert {"train/loss", "train/accuracy"} <= set(metrics.keys())
    assert 0 < metrics[SETUP_SECONDS] < 60 and 0 < metrics[FIT_SECONDS] < 60
    # What a real client sends passes the server's screen, exactly (keys, types, identity).
    census = Census(2, nodes={1: 0}, train_sizes={0: 135}, val_sizes={0: 15})
    sent = message(tiny_mnist, MessageType.TRAIN).content.array_records["arrays"]
    assert ReplyScreen(tiny_mnist, census).problem(reply, TRAIN, sent) is None


def test_evaluate_handler_replies_with_val_metrics(tiny_mnist: Config, data_root: Path) -> None:
    reply = app(message(tiny_mnist, MessageType.EVALUATE), context_for(data_root, 1))
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 15
    assert {"val/loss", "val/accuracy"} == set(metrics.keys()) - {"num-examples", UNIFORM_WEIGHT}
    census = Census(2, nodes={1: 1}, train_sizes={1: 135}, val_sizes={1: 15})
    assert ReplyScreen(tiny_mnist, census).problem(reply, EVALUATE) is None


def test_census_handler_counts_the_clients_own_labels(tiny_mnist: Config, data_root: Path) -> None:
    from fl_lightning.data.partition import label_counts

    reply = app(message(tiny_mnist, CENSUS_MESSAGE_TYPE), context_for(data_root, 1))
    assert not reply.has_error(), reply.error
    record = reply.content.config_records["census"]
    assert (record["train-size"], record["val-size"], record["own-data"]) == (135, 15, False)
    expected = label_counts(tiny_mnist.data, 2, tiny_mnist.seed)[1].tolist()
    assert record["label-counts"] == expected
    known = Known(tuple("0123456789"), ((135, 15), (135, 15)))  # as the server computes it
    assert census_problem(reply, tiny_mnist, known) is None


def test_census_handler_sends_sizes_only_under_privacy(data_root: Path) -> None:
    context = context_for(data_root, 0)
    context.run_config["overrides"] += " privacy.mode=client_dp privacy.noise_multiplier=1.0"
    cfg = config_from_run_config(context.run_config)
    reply = app(message(cfg, CENSUS_MESSAGE_TYPE), context)
    assert not reply.has_error(), reply.error
    record = reply.content.config_records["census"]
    assert set(record.keys()) == {"train-size", "val-size", "own-data"}


def test_client_dp_clients_clip_their_update_with_flowers_mod(
    tiny_mnist: Config, data_root: Path
) -> None:
    context = context_for(data_root, 0)
    context.run_config["overrides"] += " privacy.mode=client_dp privacy.noise_multiplier=1.0"
    context.run_config["overrides"] += " privacy.clipping=client"
    sent = message(tiny_mnist, MessageType.TRAIN)
    sent.content.config_records["config"]["clipping_norm"] = 0.01  # what the DP wrapper sends
    before = sent.content.array_records["arrays"].to_torch_state_dict()
    reply = app(sent, context)
    assert not reply.has_error(), reply.error
    after = reply.content.array_records["arrays"].to_torch_state_dict()
    norm = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    assert 0.009 < norm <= 0.01 + 1e-6


def test_batchnorm_query_replies_with_the_statistics_only(
    tiny_image_folder: Path, tmp_path: Path
) -> None:
    context = context_for(tiny_image_folder, 0)
    context.run_config["overrides"] = (
        f"data.dataset=cifar10 data.root={tiny_image_folder} data.cache_dir={tmp_path} "
        "model.name=cifar10_net federation.num_clients=2 strategy.batchnorm=recompute"
    )
    cfg = config_from_run_config(context.run_config)
    reply = app(message(cfg, BATCHNORM_MESSAGE_TYPE, num_classes=3), context)
    assert not reply.has_error(), reply.error
    arrays = reply.content.array_records["arrays"]
    assert all(key.endswith((".running_mean", ".running_var")) for key in arrays)
    assert len(arrays) == 6  # 3 BatchNorm layers
    assert reply.content.metric_records["metrics"]["num-examples"] == 27
    assert reply.content.config_records["client"]["partition-id"] == 0


def test_loading_the_client_app_imports_neither_torch_nor_lightning() -> None:
    # Deployment starts a fresh ClientApp process per message: loading the app stays cheap,
    # torch and Lightning load inside the handler that needs them.
    code = (
        "import sys, fl_lightning.client_app; "
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
