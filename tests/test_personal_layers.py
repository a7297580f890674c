"""strategy.local_parameters: personal layers stay on each client and out of the aggregate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fl_lightning.client import training
from fl_lightning.client.callbacks import FedProx, PersonalLayers
from fl_lightning.client.state import client_state_dir
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.data.loaders import client_data
from fl_lightning.errors import ConfigError
from fl_lightning.models.build import build_model
from fl_lightning.models.trainer import make_trainer
from fl_lightning.server.strategy import build_strategy
from tests.test_config import MNIST
from tests.test_strategy import (
    FakeGrid,
    census,
    global_arrays,
    node_partition,
    recorder,
    train_content,
)
from tests.test_strategy import task_identity as task_identity

HEAD = r"net\.3\..*"  # the MLP's output layer: FedPer's personal head


def head_config(data_root: Path, out: Path, *extra: str) -> Config:
    return load_config(
        MNIST,
        [
            f"data.root={data_root}",
            "data.max_train_samples=300",
            "federation.num_clients=2",
            "model.name=mlp",
            "data.augment=none",
            "trainer.max_epochs=1",
            f"output.dir={out}",
            *extra,
        ],
    )


def test_the_head_never_leaves_the_client_and_evaluates_as_its_own(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = head_config(data_root, tmp_path, f"strategy.local_parameters=['{HEAD}']")
    torch.manual_seed(0)
    x = build_model(cfg).state_dict()
    first = training.fit(cfg, x, 0, 2, server_round=1)
    assert first.state_dict is not None
    assert not [k for k in first.state_dict if k.startswith("net.3.")]  # not sent
    saved = torch.load(client_state_dir(cfg.output.dir, 0) / "round_1.pt", weights_only=True)
    own = saved["callbacks"]["PersonalLayers"]["own"]
    assert set(own) == {"net.3.weight", "net.3.bias"}

    # The server's values for the head (its initial ones, here zeros) are not used: the
    # client validates with its own head, as a model holding it would.
    server = {**first.state_dict, **{k: torch.zeros_like(v) for k, v in own.items()}}
    evaluated = training.validate(cfg, server, 0, 2).metrics
    plain = head_config(data_root, tmp_path / "plain")
    expected = training.validate(plain, {**first.state_dict, **own}, 0, 2).metrics
    assert evaluated == pytest.approx(expected)

    # Round 1's evaluate message reads round 1's head, not that of a later round the
    # client already trained (a --resume that redoes rounds).
    later = training.fit(cfg, {**first.state_dict, **own}, 0, 2, server_round=3)
    assert later.state_dict is not None
    assert training.validate(cfg, server, 0, 2, server_round=1).metrics == evaluated
    assert training.validate(cfg, server, 0, 2).metrics != evaluated  # the newest: round 3


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ("['decoder.*']", "match none of the"),
        ("['.*']", "match all of the"),
        ("['net.(']", r"strategy.local_parameters\[0\]: 'net.\(' is not a regular expression"),
    ],
)
def test_patterns_that_keep_nothing_or_everything_are_refused(patterns: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(load_config(MNIST, [f"strategy.local_parameters={patterns}"]))


def test_strategies_that_are_not_a_mean_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"strategy.local_parameters: works with fedavg"):
        load_config(MNIST, ["strategy.local_parameters=['net.*']", "strategy.name=fedadam"])


def test_the_server_aggregates_the_rest_and_keeps_its_own_values_of_the_personal_ones() -> None:
    cfg = load_config(MNIST, ["strategy.local_parameters=['count']"])
    strategy = build_strategy(cfg, recorder(), census(), min_available_nodes=5)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    replies = []
    for message in messages:
        partition = node_partition(message)
        arrays = ArrayRecord({"w": Array(np.full((2, 3), 0.1 * (partition + 1), np.float32))})
        if partition == 4:  # a client that sends its personal entry after all
            arrays["count"] = Array(np.array(99, np.int64))
        replies.append(Message(content=train_content(arrays, partition, 100), reply_to=message))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.recorder.metrics["rejected"] == 1
    np.testing.assert_allclose(arrays["w"].numpy(), 0.25, rtol=1e-6)  # mean of 0.1..0.4
    assert arrays["count"].numpy() == 10  # the global model's own value
    assert list(arrays.keys()) == ["w", "count"]  # the model's order


def test_fedprox_pulls_toward_the_clients_own_layers_not_the_servers(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = head_config(data_root, tmp_path, f"strategy.local_parameters=['{HEAD}']")
    model = build_model(cfg)
    own = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items() if "net.3." in k}
    personal, prox = PersonalLayers(sorted(own)), FedProx(mu=0.1)
    personal.own = own
    trainer = make_trainer(cfg.trainer, callbacks=[prox, personal], limit_train_batches=1)
    data = client_data(cfg, 0, 2, seed=0)
    trainer.fit(model, train_dataloaders=data.train)
    names = {id(p): k for k, p in model.named_parameters()}
    anchored = {names[id(p)]: start for p, start in prox.anchor}
    assert all(anchored[k].equal(v) for k, v in own.items())
