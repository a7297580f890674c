"""Client-level DP: the noise added is what the ledger's epsilon assumes, whoever replied."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message

from fl_lightning.config.load import load_config
from fl_lightning.privacy.ledger import PrivacyLedger
from fl_lightning.server.dp_fedavg import clip_update, wrap_strategy
from fl_lightning.server.strategy import build_strategy
from tests.test_config import MNIST
from tests.test_strategy import FakeGrid, census, node_partition, recorder, train_content

__all__ = ["task_identity"]  # the autouse fixture Flower's messages need
from tests.test_strategy import task_identity


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_noise_is_what_the_ledger_assumes_when_two_of_five_sampled_clients_fail(
    clipping: str,
) -> None:
    cfg = load_config(
        MNIST,
        ["privacy.mode=client_dp", "privacy.noise_multiplier=2.0", "privacy.clipping_norm=0.5",
         f"privacy.clipping={clipping}"],
    )  # fmt: skip
    ledger = PrivacyLedger(cfg, [100] * 5)
    rounds = recorder()
    rounds.ledger = ledger
    strategy = build_strategy(cfg, rounds, census(), min_available_nodes=5)
    runner = wrap_strategy(strategy, cfg, ledger)
    model = ArrayRecord({"w": Array(np.zeros(400_000, np.float32))})
    messages = list(runner.configure_train(1, model, ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    assert len(messages) == 5
    # Three clients send the same small update (norm 0.2, under the clipping norm), two
    # fail: what is released is their sum over the 5 sampled, plus the noise.
    update = np.full(400_000, 0.2 / np.sqrt(400_000), np.float32)
    sent = ArrayRecord({"w": Array(update)})
    replies = [Message(train_content(sent, node_partition(m)), reply_to=m) for m in messages[:3]]
    replies += [Message(Error(0, "RuntimeError: out of memory"), reply_to=m) for m in messages[3:]]
    arrays, _ = runner.aggregate_train(1, replies)
    assert arrays is not None
    noise = arrays["w"].numpy() - 3 / 5 * update
    # The ledger composes Gaussian releases of multiplier sigma on a sum of clipped updates
    # over the sampled clients: sensitivity clipping_norm / 5 whoever replied.
    assumed = ledger.client_dp_noise_multiplier * cfg.privacy.clipping_norm / 5
    assert noise.std() == pytest.approx(assumed, rel=0.01)
    assert abs(noise.mean()) < 0.01 * assumed
    assert len(ledger.releases.history) == 1


def test_the_server_clips_every_update_it_sees_and_a_zero_update_stays_zero() -> None:
    reference = ArrayRecord({"w": Array(np.ones(4, np.float32))})
    big = ArrayRecord({"w": Array(np.array([4.0, 1.0, 1.0, 1.0], np.float32))})  # update norm 3
    clipped = clip_update(big, reference, 0.5)["w"].numpy()
    assert clipped.dtype == np.float32
    np.testing.assert_allclose(clipped, [1.5, 1.0, 1.0, 1.0], rtol=1e-6)
    small = ArrayRecord({"w": Array(np.array([1.1, 1.0, 1.0, 1.0], np.float32))})
    np.testing.assert_array_equal(
        clip_update(small, reference, 0.5)["w"].numpy(), small["w"].numpy()
    )
    # Flower's own clipping divides by the update's norm: an unchanged model ended the run.
    np.testing.assert_array_equal(clip_update(reference, reference, 0.5)["w"].numpy(), np.ones(4))


def released_noise(*overrides: str) -> np.ndarray:
    """The noise one client-DP release adds when all 5 clients send a zero update."""
    cfg = load_config(MNIST, ["privacy.mode=client_dp", "privacy.noise_multiplier=1.0", *overrides])
    ledger = PrivacyLedger(cfg, [100] * 5)
    rounds = recorder()
    rounds.ledger = ledger
    runner = wrap_strategy(build_strategy(cfg, rounds, census()), cfg, ledger)
    model = ArrayRecord({"w": Array(np.zeros(1000, np.float32))})
    messages = list(runner.configure_train(1, model, ConfigRecord(), FakeGrid()))  # type: ignore[arg-type]
    replies = [Message(train_content(model, node_partition(m)), reply_to=m) for m in messages]
    arrays, _ = runner.aggregate_train(1, replies)
    assert arrays is not None
    return arrays["w"].numpy()


def test_two_client_dp_runs_with_the_same_seed_draw_different_noise_unless_asked() -> None:
    assert not np.array_equal(released_noise(), released_noise())
    seeded = "privacy.reproducible_noise=true"
    np.testing.assert_array_equal(released_noise(seeded), released_noise(seeded))
