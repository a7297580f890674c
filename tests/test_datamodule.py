import torch

from fl_lightning.config import Config
from fl_lightning.datamodule import FederatedDataModule


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
