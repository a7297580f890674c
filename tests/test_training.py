from pathlib import Path

import torch

from fl_lightning import training
from fl_lightning.config import Config, load_config
from fl_lightning.models import build_model
from tests.test_config import MNIST


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(cfg, 10).state_dict()


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


def test_validate_reports_val_metrics(tiny_mnist: Config) -> None:
    result = training.validate(
        tiny_mnist, initial_state(tiny_mnist), partition_id=1, num_partitions=2
    )
    assert set(result.metrics) == {"val/loss", "val/accuracy"}
    assert result.num_examples == 15
    assert 0.0 <= result.metrics["val/accuracy"] <= 1.0


def test_batchnorm_counters_stay_integers(tiny_image_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(
        MNIST,
        [
            "data.dataset=cifar10",
            f"data.root={tiny_image_folder}",
            f"data.cache_dir={tmp_path}",
            "model.name=cifar10_net",
            "trainer.max_epochs=1",
            "federation.num_clients=2",
        ],
    )
    state = build_model(cfg, 3).state_dict()
    result = training.fit(cfg, state, partition_id=0, num_partitions=2, server_round=1)
    assert result.state_dict is not None
    counter = result.state_dict["net.1.num_batches_tracked"]
    assert counter.dtype == torch.long and counter.item() == 1  # 27 samples: one batch of 32
