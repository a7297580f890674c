"""federation.stateful_clients: a client's optimizer state continues across its rounds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fl_lightning.client import training
from fl_lightning.client.state import client_state_dir
from fl_lightning.client.training import client_seed
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.data.loaders import client_data
from fl_lightning.errors import ConfigError
from fl_lightning.models.build import build_model
from tests.test_config import MNIST


def adam_config(data_root: Path, out: Path, stateful: bool) -> Config:
    """One Adam client of 135 samples, nothing random in its steps but the batch order."""
    return load_config(
        MNIST,
        [
            f"data.root={data_root}",
            "data.max_train_samples=300",
            "federation.num_clients=2",
            "model.name=mlp",
            "model.label_smoothing=0",
            "data.augment=none",
            "optimizer.name=adam",
            "optimizer.lr=0.01",
            "trainer.gradient_clip_val=null",
            "trainer.max_epochs=1",
            f"federation.stateful_clients={str(stateful).lower()}",
            f"output.dir={out}",
        ],
    )


def two_rounds(cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Client 0's rounds 1 and 2, the second from the first's weights (a server of one)."""
    torch.manual_seed(0)
    initial = build_model(cfg).state_dict()
    first = training.fit(cfg, initial, 0, 2, server_round=1).state_dict
    assert first is not None
    second = training.fit(cfg, first, 0, 2, server_round=2).state_dict
    assert second is not None
    return initial, second


def uninterrupted(cfg: Config, initial: dict[str, torch.Tensor]) -> tuple[dict, torch.optim.Adam]:
    """One Adam run over round 1's batches, then round 2's, in the client's order."""
    model = build_model(cfg)
    model.load_state_dict(initial)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for server_round in (1, 2):
        data = client_data(cfg, 0, 2, client_seed(cfg.seed, server_round, 0))
        for images, labels in data.train:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model.state_dict(), optimizer


def test_adam_continues_as_one_uninterrupted_run(data_root: Path, tmp_path: Path) -> None:
    cfg = adam_config(data_root, tmp_path, stateful=True)
    initial, second = two_rounds(cfg)
    weights, optimizer = uninterrupted(cfg, initial)

    folder = client_state_dir(cfg.output.dir, 0)
    saved = torch.load(folder / "round_2.pt", weights_only=True)["optimizers"][0]["state"]
    expected = optimizer.state_dict()["state"]
    steps = 2 * 5  # 135 samples in batches of 32, twice
    assert all(float(s["step"]) == steps for s in saved.values())
    for index, state in expected.items():
        assert torch.allclose(saved[index]["exp_avg"], state["exp_avg"], atol=1e-6)
        assert torch.allclose(saved[index]["exp_avg_sq"], state["exp_avg_sq"], atol=1e-8)
    assert all(torch.allclose(second[k], weights[k], atol=1e-5) for k in weights)
    assert sorted(p.name for p in folder.iterdir()) == ["round_1.pt", "round_2.pt"]


def test_without_the_flag_each_round_starts_a_fresh_optimizer(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = adam_config(data_root, tmp_path, stateful=False)
    initial, second = two_rounds(cfg)
    weights, _ = uninterrupted(cfg, initial)
    assert not any(torch.allclose(second[k], weights[k], atol=1e-5) for k in weights)
    assert not (tmp_path / "client_state").exists()


def test_a_redone_round_continues_from_the_round_before_it(data_root: Path, tmp_path: Path) -> None:
    cfg = adam_config(data_root, tmp_path, stateful=True)
    initial, second = two_rounds(cfg)
    # --resume after a kill that came after the client's round 2 but before the server
    # closed it: round 2 runs again, from round 1's state, and gives the same result.
    first = training.fit(cfg, initial, 0, 2, server_round=1).state_dict
    assert first is not None
    again = training.fit(cfg, first, 0, 2, server_round=2).state_dict
    assert again is not None
    assert all(torch.equal(again[k], second[k]) for k in second)


def test_a_client_keeps_the_state_of_its_last_three_rounds(data_root: Path, tmp_path: Path) -> None:
    cfg = adam_config(data_root, tmp_path, stateful=True)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    for server_round in (1, 2, 4, 7):
        state = training.fit(cfg, state, 0, 2, server_round=server_round).state_dict
    # A --resume redoes at most the last two rounds (the server closes at most one behind):
    # round 4's state is there for a redone round 7, and round 2's for a redone round 4.
    folder = client_state_dir(cfg.output.dir, 0)
    assert sorted(p.name for p in folder.iterdir()) == ["round_2.pt", "round_4.pt", "round_7.pt"]


def test_a_server_lr_schedule_is_refused_with_stateful_clients() -> None:
    with pytest.raises(ConfigError, match=r"federation.stateful_clients: continues"):
        load_config(MNIST, ["federation.stateful_clients=true", "optimizer.round_decay=0.9"])


def test_only_the_clients_own_state_continues_not_the_users_callbacks(
    data_root: Path, tmp_path: Path
) -> None:
    # Lightning's EMA counts the Trainer's steps; a fresh Trainer each round restarts them,
    # so its saved step count would freeze the average at the weights the server sent.
    cfg = adam_config(data_root, tmp_path, stateful=True)
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, ema_decay=0.5))
    torch.manual_seed(0)
    first = training.fit(cfg, build_model(cfg).state_dict(), 0, 2, server_round=1).state_dict
    assert first is not None
    second = training.fit(cfg, first, 0, 2, server_round=2).state_dict
    assert second is not None
    assert not all(torch.equal(second[k], first[k]) for k in first)  # round 2 trained
    saved = torch.load(client_state_dir(cfg.output.dir, 0) / "round_2.pt", weights_only=True)
    assert saved["callbacks"] == {}
