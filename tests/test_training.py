import dataclasses
from pathlib import Path

import torch

from fl_lightning.client import training
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.data.datamodule import FederatedDataModule
from fl_lightning.models.build import build_model
from tests.test_config import MNIST


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(cfg, 10).state_dict()


def tiny_cifar(image_folder: Path, cache: Path, *overrides: str) -> Config:
    """CIFAR10Net on the 3-class JPEG tree of conftest, split between 2 clients."""
    return load_config(
        MNIST,
        [
            "data.dataset=cifar10",
            f"data.root={image_folder}",
            f"data.cache_dir={cache}",
            "model.name=cifar10_net",
            "federation.num_clients=2",
            *overrides,
        ],
    )


def test_fit_trains_and_is_deterministic(tiny_mnist: Config) -> None:
    state = initial_state(tiny_mnist)
    a = training.fit(tiny_mnist, state, partition_id=0, num_partitions=2, server_round=1)
    b = training.fit(tiny_mnist, state, partition_id=0, num_partitions=2, server_round=1)
    assert a.state_dict is not None and b.state_dict is not None
    assert a.num_examples == 135
    assert set(a.metrics) == {"train/loss", "train/accuracy"}
    assert a.state_dict.keys() == state.keys()
    assert not torch.equal(a.state_dict["net.0.weight"], state["net.0.weight"])
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in state)


def test_ema_decay_sends_the_moving_average_of_the_local_steps(tiny_mnist: Config) -> None:
    state = initial_state(tiny_mnist)

    def fit(ema_decay: float | None, steps: int | None = None) -> dict[str, torch.Tensor]:
        trainer = dataclasses.replace(tiny_mnist.trainer, limit_train_batches=steps)
        optimizer = dataclasses.replace(tiny_mnist.optimizer, ema_decay=ema_decay)
        cfg = dataclasses.replace(tiny_mnist, trainer=trainer, optimizer=optimizer)
        result = training.fit(cfg, state, partition_id=0, num_partitions=2, server_round=1)
        assert result.state_dict is not None
        return result.state_dict

    def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return sum(float((a[k].float() - b[k].float()).norm()) for k in state)

    last, ema, slow, first_step = fit(None), fit(0.5), fit(0.9999), fit(None, steps=1)
    assert distance(ema, last) > 0.01 * distance(last, state)  # the average, not the last step
    assert distance(ema, first_step) > 0.1 * distance(last, first_step)  # it moved on
    # The average starts at the first step's weights (torch's AveragedModel); 4 more steps
    # at decay 0.9999 leave it within 0.05% of them.
    assert distance(slow, first_step) < 0.01 * distance(last, first_step)


def test_validate_reports_val_metrics(tiny_mnist: Config) -> None:
    result = training.validate(
        tiny_mnist, initial_state(tiny_mnist), partition_id=1, num_partitions=2
    )
    assert set(result.metrics) == {"val/loss", "val/accuracy"}
    assert result.num_examples == 15
    assert 0.0 <= result.metrics["val/accuracy"] <= 1.0


def test_batchnorm_counters_stay_integers(tiny_image_folder: Path, tmp_path: Path) -> None:
    cfg = tiny_cifar(tiny_image_folder, tmp_path, "trainer.max_epochs=1")
    state = build_model(cfg, 3).state_dict()
    result = training.fit(cfg, state, partition_id=0, num_partitions=2, server_round=1)
    assert result.state_dict is not None
    counter = result.state_dict["net.1.num_batches_tracked"]
    assert counter.dtype == torch.long and counter.item() == 1  # 27 samples: one batch of 32


def test_batchnorm_statistics_are_measured_on_the_clients_batches(
    tiny_image_folder: Path, tmp_path: Path
) -> None:
    cfg = tiny_cifar(
        tiny_image_folder, tmp_path, "strategy.batchnorm=recompute", "data.augment=none"
    )
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    state = model.state_dict()
    result = training.batchnorm_statistics(cfg, state, 0, 2, server_round=1)
    assert result.state_dict is not None
    assert set(result.state_dict) == {
        f"net.{i}.{stat}" for i in (1, 5, 9) for stat in ("running_mean", "running_var")
    }
    assert result.num_examples == 27  # one batch: client 0's 30 images minus 3 for validation
    # One batch: the statistics are that batch's, per channel of the first convolution.
    (images, _) = next(iter(FederatedDataModule(cfg.data, cfg.seed, 0, 2).train_dataloader()))
    with torch.no_grad():
        features = model.net[0](images)
    torch.testing.assert_close(result.state_dict["net.1.running_mean"], features.mean((0, 2, 3)))
    torch.testing.assert_close(
        result.state_dict["net.1.running_var"], features.var((0, 2, 3), unbiased=True)
    )
