"""SCAFFOLD: the client's correction (a callback), the server's control variate, its screen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fl_lightning.client import training
from fl_lightning.client.callbacks import Scaffold
from fl_lightning.client.state import client_state_dir
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.errors import ConfigError
from fl_lightning.models.build import build_model
from fl_lightning.server.control_variates import moved_control
from fl_lightning.server.strategy import build_strategy
from fl_lightning.server.strategy_state import decode_strategy_state, strategy_state
from fl_lightning.vocabulary import SCAFFOLD_RECORD
from tests.test_config import MNIST
from tests.test_strategy import FakeGrid, census, global_arrays, recorder, reply_to
from tests.test_strategy import task_identity as task_identity


def sgd_config(data_root: Path, out: Path) -> Config:
    """One plain-SGD client (no momentum, nothing random but the batch order)."""
    return load_config(
        MNIST,
        [
            f"data.root={data_root}",
            "data.max_train_samples=300",
            "federation.num_clients=2",
            "model.name=mlp",
            "model.label_smoothing=0",
            "data.augment=none",
            "optimizer.momentum=0",
            "optimizer.lr=0.1",
            "trainer.gradient_clip_val=null",
            "trainer.max_epochs=1",
            "strategy.name=scaffold",
            f"output.dir={out}",
        ],
    )


def floating(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point()}


def test_the_correction_adds_c_minus_c_i_to_every_gradient_and_moves_c_i() -> None:
    module = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scaffold = Scaffold({"weight": torch.tensor([[1.0, 2.0]])})
    scaffold.load_state_dict({"own": {"weight": torch.tensor([[0.5, 0.5]])}})
    start = module.weight.detach().clone()
    scaffold.on_fit_start(None, module)  # type: ignore[arg-type]
    for _ in range(3):
        optimizer.zero_grad()
        module(torch.ones(1, 2)).sum().backward()  # gradient [1, 1]
        scaffold.on_before_optimizer_step(None, module, optimizer)  # type: ignore[arg-type]
        assert torch.allclose(module.weight.grad, torch.tensor([[1.5, 2.5]]))
        optimizer.step()
    scaffold.on_fit_end(None, module)  # type: ignore[arg-type]
    moved = start - module.weight.detach()
    assert torch.allclose(moved, 3 * 0.1 * torch.tensor([[1.5, 2.5]]))
    # c_i+ = c_i - c + (x - y) / (K lr) = the mean corrected gradient - c + c_i = [1, 1].
    assert torch.allclose(scaffold.own["weight"], torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(scaffold.delta["weight"], torch.tensor([[0.5, 0.5]]))


def test_a_client_keeps_c_i_between_its_rounds(data_root: Path, tmp_path: Path) -> None:
    cfg = sgd_config(data_root, tmp_path / "kept")
    torch.manual_seed(0)
    x = build_model(cfg).state_dict()
    zero = floating(x)
    first = training.fit(cfg, x, 0, 2, server_round=1, control=zero)
    assert first.state_dict is not None and first.control_delta is not None
    assert set(first.control_delta) == set(zero)
    steps = 5  # 135 samples in batches of 32, lr 0.1
    expected = (x["net.1.weight"] - first.state_dict["net.1.weight"]) / (steps * 0.1)
    assert torch.allclose(first.control_delta["net.1.weight"], expected, atol=1e-6)
    saved = torch.load(client_state_dir(cfg.output.dir, 0) / "round_1.pt", weights_only=True)
    assert torch.allclose(saved["callbacks"]["Scaffold"]["own"]["net.1.weight"], expected)
    # Round 2 corrects by c - c_i with the kept c_i; a client without it (another run
    # folder) does not.
    kept = training.fit(cfg, x, 0, 2, server_round=2, control=zero).state_dict
    fresh_cfg = sgd_config(data_root, tmp_path / "fresh")
    fresh = training.fit(fresh_cfg, x, 0, 2, server_round=2, control=zero).state_dict
    assert kept is not None and fresh is not None
    assert not torch.allclose(kept["net.1.weight"], fresh["net.1.weight"])


def with_change(message: Message, shift: float, change: float) -> Message:
    reply = reply_to(message, shift, 20, 100)
    reply.content[SCAFFOLD_RECORD] = ArrayRecord({"w": Array(np.full((2, 3), change, np.float32))})
    return reply


def test_the_server_moves_c_by_the_share_of_the_mean_change_and_screens_it() -> None:
    cfg = load_config(MNIST, ["strategy.name=scaffold", "federation.num_clients=10"])
    strategy = build_strategy(cfg, recorder(), census(10), min_available_nodes=5)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    sent = messages[0].content.array_records[SCAFFOLD_RECORD]
    assert set(sent.keys()) == {"w"} and not sent["w"].numpy().any()  # c starts at zero
    replies = [with_change(m, 0.1, 0.5) for m in messages[:3]]
    replies.append(with_change(messages[3], 0.1, 1e6))  # a change far beyond the round's
    wrong = reply_to(messages[4], 0.1, 20, 100)
    wrong.content[SCAFFOLD_RECORD] = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    arrays, _ = strategy.aggregate_train(1, [*replies, wrong])
    assert arrays is not None
    assert strategy.recorder.metrics["rejected"] == 2  # the huge and the wrong-shaped change
    # c += (|S| / N) * mean(changes): 3 adopted clients of 10.
    assert strategy.control is not None
    np.testing.assert_allclose(strategy.control["w"].numpy(), 0.3 * 0.5, rtol=1e-6)

    # --resume keeps c.
    weights = {k: torch.from_numpy(a.numpy()) for k, a in global_arrays().items()}
    state = strategy_state(strategy)
    restored = decode_strategy_state(type(strategy), state, weights, 10)
    np.testing.assert_array_equal(restored["control"]["w"].numpy(), strategy.control["w"].numpy())


def test_scaffold_is_refused_where_its_clear_text_changes_are_not_covered() -> None:
    with pytest.raises(ConfigError, match=r"strategy.name: scaffold's clients send"):
        load_config(MNIST, ["strategy.name=scaffold", "privacy.mode=client_dp",
                            "privacy.noise_multiplier=1.0"])  # fmt: skip


def test_a_control_variate_that_would_overflow_is_not_adopted() -> None:
    control = ArrayRecord({"w": Array(np.full(3, 1.0, np.float32))})
    huge = ArrayRecord({"w": Array(np.full(3, 3e38, np.float32))})  # finite, screened as such
    kept = moved_control(control, [huge, huge], share=1.0)
    np.testing.assert_array_equal(kept["w"].numpy(), control["w"].numpy())
    moved = moved_control(control, [ArrayRecord({"w": Array(np.ones(3, np.float32))})], 0.5)
    np.testing.assert_allclose(moved["w"].numpy(), 1.5)


def test_scaffold_trains_each_client_on_one_device() -> None:
    with pytest.raises(ConfigError, match=r"trainer.devices: scaffold trains each client on one"):
        load_config(MNIST, ["strategy.name=scaffold", "trainer.devices=2"])
