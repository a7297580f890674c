import pytest
import torch

from fl_lightning.config.schema import Config
from fl_lightning.data.datamodule import FederatedDataModule
from fl_lightning.errors import ConfigError


def test_client_loaders_cover_its_partition(tiny_mnist: Config) -> None:
    dm = FederatedDataModule(tiny_mnist.data, tiny_mnist.seed, partition_id=1, num_partitions=2)
    train = list(dm.train_dataloader())
    assert sum(len(y) for _, y in train) == len(dm.train_indices) == 135  # 150 minus 10% validation
    assert sum(len(y) for _, y in dm.val_dataloader()) == 15
    assert sum(len(y) for _, y in dm.test_dataloader()) == 200
    images, labels = train[0]
    assert images.shape == (32, 1, 28, 28) and labels.dtype == torch.long


def test_shuffle_order_follows_the_shuffle_seed(tiny_mnist: Config) -> None:
    def first_labels(seed: int) -> list[int]:
        dm = FederatedDataModule(tiny_mnist.data, tiny_mnist.seed, 0, 2, shuffle_seed=seed)
        return next(iter(dm.train_dataloader()))[1].tolist()

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)


def test_noisy_clients_read_noisy_data(tiny_mnist: Config) -> None:
    import dataclasses

    from fl_lightning.config.schema import NoiseConfig

    data = dataclasses.replace(tiny_mnist.data, noise=NoiseConfig(clients=(1,), std=0.5))
    clean = FederatedDataModule(data, tiny_mnist.seed, 0, 2)
    noisy = FederatedDataModule(data, tiny_mnist.seed, 1, 2)
    assert not clean.noisy and noisy.noisy
    reference = FederatedDataModule(tiny_mnist.data, tiny_mnist.seed, 1, 2)
    noisy_batch = next(iter(noisy.val_dataloader()))[0]
    assert not torch.equal(noisy_batch, next(iter(reference.val_dataloader()))[0])
    # The server's clean test split stays clean; the noisy one is the noisy clients' kind.
    assert torch.equal(
        next(iter(noisy.test_dataloader()))[0], next(iter(reference.test_dataloader()))[0]
    )
    assert not torch.equal(
        next(iter(noisy.noisy_test_dataloader()))[0], next(iter(noisy.test_dataloader()))[0]
    )


def test_partition_id_outside_the_federation_is_refused(tiny_mnist: Config) -> None:
    with pytest.raises(ConfigError, match=r"partition-id 2 is outside 0\.\.1"):
        FederatedDataModule(tiny_mnist.data, tiny_mnist.seed, partition_id=2, num_partitions=2)


def test_evaluation_batches_are_larger_than_training_ones(tiny_mnist: Config) -> None:
    client = FederatedDataModule(tiny_mnist.data, tiny_mnist.seed, 0, 2)
    server = FederatedDataModule(tiny_mnist.data, tiny_mnist.seed)
    assert client.train_dataloader().batch_size == tiny_mnist.data.batch_size == 32
    assert client.val_dataloader().batch_size == tiny_mnist.data.eval_batch_size == 64
    assert server.test_dataloader().batch_size == 64
