"""Runs survive failing clients and refuse bad updates (faults injected by tests/faults.py)."""

import logging
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType
from flwr.clientapp.typing import Mod
from flwr.simulation import run_simulation

from fl_lightning.client_app import make_client_app
from fl_lightning.config.load import load_config
from fl_lightning.errors import NothingTrained
from fl_lightning.run.simulation import backend_config
from fl_lightning.server.rundir import RunDir, create_run_dir
from fl_lightning.server_app import make_server_app
from tests import faults
from tests.test_end_to_end import read_metrics


def simulate(
    data_root: Path,
    out: Path,
    overrides: list[str],
    mods: list[Mod],
    clients: int = 5,
    per_client: int = 120,
) -> RunDir:
    """configs/mnist.yaml, shrunk, simulated in this process with the given client mods."""
    cfg = load_config(
        "configs/mnist.yaml",
        [
            f"data.root={data_root}",
            f"data.max_train_samples={per_client * clients}",
            "data.max_test_samples=500",
            f"federation.num_clients={clients}",
            "federation.num_rounds=2",
            "trainer.max_epochs=1",
            f"output.dir={out}",
            *overrides,
        ],
    )
    run = create_run_dir(cfg)
    run_simulation(
        server_app=make_server_app(cfg, run, console=False),
        client_app=make_client_app(cfg, mods=mods),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg),
    )
    return run


# Krum keeps a single client's model: it must learn something from 360 samples.
LEARN_MORE = ["trainer.max_epochs=2", "data.batch_size=16", "data.augment=none"]
# The update screen would reject these poisoned updates before any strategy saw them: off,
# so these tests are of the strategies themselves.
UNSCREENED = ["strategy.update_norm_factor=null"]


SCALED = faults.scaled([2, 7], 100.0)
RANDOM = faults.random_weights([2, 7], std=1.0)


def final_weights_are_finite(run: RunDir) -> bool:
    state = torch.load(run.checkpoint("last"), map_location="cpu", weights_only=True)
    return all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )


@pytest.mark.parametrize(
    ("fault", "counter", "per_round"),
    [
        # Answers the census, then raises in train and evaluate: one failure each.
        (faults.raising([3], [MessageType.TRAIN, MessageType.EVALUATE]), "failures", 2),
        (faults.nan_weights([3]), "rejected", 1),
        (faults.wrong_shapes([3]), "rejected", 1),
    ],
    ids=["raises", "nan", "wrong-shapes"],
)
def test_one_bad_client_of_five_is_counted_and_left_out(
    fault: Mod,
    counter: str,
    per_round: int,
    data_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flwr")
    run = simulate(data_root, tmp_path / "run", [], [fault])
    records = read_metrics(run.path)
    assert [r["round"] for r in records] == [0, 1, 2]  # the run completed
    assert [r[counter] for r in records[1:]] == [per_round, per_round]
    assert records[2]["test/loss"] < records[0]["test/loss"]  # still learning
    assert final_weights_are_finite(run)
    # The client's problem is said once, readable, then only counted.
    said = [r.getMessage() for r in caplog.records if "(repeats are counted" in r.getMessage()]
    assert len(said) == 1, said  # train and evaluate fail alike: said once
    if counter == "failures":
        assert "RuntimeError: injected failure in client 3 (repeats" in said[0]


def test_a_round_with_too_few_updates_is_skipped(data_root: Path, tmp_path: Path) -> None:
    # Its only round skipped, the run trained nothing: it ends with NothingTrained, and
    # its directory keeps the rounds it wrote.
    with pytest.raises(NothingTrained):
        simulate(
            data_root,
            tmp_path / "run",
            ["federation.min_train_clients=2", "federation.num_rounds=1"],
            [faults.raising([0, 1, 2, 3], [MessageType.TRAIN, MessageType.EVALUATE])],
        )
    initial, skipped = read_metrics(tmp_path / "run")
    assert skipped["failures"] == 8  # 4 clients, train and evaluate
    # Nothing was aggregated: the global model is the initial one.
    assert skipped["test/loss"] == initial["test/loss"]


# Krum against both attacks; FedMedian (a coordinate-wise median, which no outlier moves
# far by construction) against the random weights only, to keep the suite's time.
@pytest.mark.parametrize(
    ("strategy", "attacks"), [("krum", ("scaled", "random")), ("fedmedian", ("random",))]
)
def test_robust_strategies_shrug_off_two_of_ten_clients_poisoning_their_weights(
    strategy: str, attacks: tuple[str, ...], data_root: Path, tmp_path: Path
) -> None:
    overrides = [f"strategy.name={strategy}", "strategy.num_malicious_clients=2", *LEARN_MORE]
    overrides += UNSCREENED
    sizes = {"clients": 10, "per_client": 400}
    clean = read_metrics(simulate(data_root, tmp_path / "clean", overrides, [], **sizes).path)
    assert clean[-1]["test/accuracy"] > 0.7  # a model worth protecting
    for name in attacks:
        attack = {"scaled": SCALED, "random": RANDOM}[name]
        attacked = simulate(data_root, tmp_path / name, overrides, [attack], **sizes)
        final = read_metrics(attacked.path)[-1]["test/accuracy"]
        # Krum keeps one honest client's model, and which one can change with the attack
        # (and with the CPU's float kernels): honest clients differ by a few points, while
        # the poisoned FedAvg below falls under 0.5.
        assert final >= clean[-1]["test/accuracy"] - 0.05, name
        assert final_weights_are_finite(attacked)


def test_plain_fedavg_is_wrecked_by_random_weights(data_root: Path, tmp_path: Path) -> None:
    # The checks above can fail: without a robust strategy (or the update screen), two
    # poisoned clients of ten destroy the model. (Scaling alone leaves FedAvg's argmax
    # nearly intact: MNISTNet is positively homogeneous, so a scaled average mostly scales
    # the logits.)
    attacked = simulate(
        data_root,
        tmp_path / "run",
        [*LEARN_MORE, *UNSCREENED],
        [RANDOM],
        clients=10,
        per_client=400,
    )
    assert read_metrics(attacked.path)[-1]["test/accuracy"] < 0.5


def test_a_client_past_the_round_timeout_counts_as_failed(data_root: Path, tmp_path: Path) -> None:
    # 25 s: time for the other clients' first round (Ray actors start, Lightning loads)
    # on a busy 2-core machine; the stalled client answers only after 45 s.
    run = simulate(
        data_root,
        tmp_path / "run",
        ["federation.round_timeout=25", "federation.num_rounds=1"],
        [faults.stalling([2], 45.0)],
        clients=3,
    )
    _, record = read_metrics(run.path)
    # Its train reply never came: the round went on without it after 25 s. (Its evaluate
    # reply may be late too: the stalled Ray worker holds the messages queued behind it.)
    assert record["failures"] >= 1
    assert 25 <= record["time/client_training"] < 45
    assert "train/loss" in record  # the other two clients' updates were aggregated
