import pytest
import torch

from fl_lightning.config.schema import Config
from fl_lightning.data.partition import (
    iid_partitions,
    label_counts,
    label_partitions,
    subsample,
    train_val_split,
)
from fl_lightning.errors import ConfigError


def test_iid_partitions_are_disjoint_covering_and_equal() -> None:
    parts = iid_partitions(torch.arange(1003), 5, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    joined = torch.cat(parts)
    assert len(joined) == 1003
    assert torch.equal(joined.sort().values, torch.arange(1003))


def test_iid_partitions_are_seeded() -> None:
    a = iid_partitions(torch.arange(600), 3, seed=5)
    b = iid_partitions(torch.arange(600), 3, seed=5)
    c = iid_partitions(torch.arange(600), 3, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_more_clients_than_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"federation\.num_clients"):
        iid_partitions(torch.arange(3), 4, seed=0)


def test_train_val_split_holds_out_the_fraction() -> None:
    train, val = train_val_split(torch.arange(100, 200), 0.1, seed=0)
    assert (len(train), len(val)) == (90, 10)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert set(train.tolist()) | set(val.tolist()) == set(range(100, 200))


def test_subsample_caps_without_duplicates() -> None:
    picked = subsample(1000, 300, seed=3)
    assert len(picked) == len(set(picked.tolist())) == 300
    assert torch.equal(subsample(1000, None, seed=3), torch.arange(1000))
    assert torch.equal(picked, subsample(1000, 300, seed=3))


def test_dirichlet_partitions_are_skewed_and_seeded() -> None:
    labels = torch.arange(2000) % 10
    parts = label_partitions(labels, 5, "dirichlet", seed=3, alpha=0.1)
    again = label_partitions(labels, 5, "dirichlet", seed=3, alpha=0.1)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    joined = torch.cat(parts)
    assert len(joined) == len(set(joined.tolist())) == 2000  # disjoint and covering
    # alpha=0.1: each client is dominated by few classes (IID would give ~10% each)
    top_share = [torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts]
    assert sum(top_share) / 5 > 0.4


def test_shards_give_each_client_few_labels() -> None:
    labels = torch.arange(6000) % 10
    parts = label_partitions(labels, 10, "shards", seed=0, shards_per_client=2)
    assert [len(p) for p in parts] == [600] * 10  # 20 shards of 300
    assert len(set(torch.cat(parts).tolist())) == 6000
    assert all(len(set(labels[p].tolist())) <= 2 for p in parts)
    with pytest.raises(ConfigError, match=r"data\.shards_per_client"):
        label_partitions(labels[:10], 10, "shards", seed=0, shards_per_client=2)


def test_label_counts_cover_each_clients_training_samples(tiny_mnist: Config) -> None:
    counts = label_counts(tiny_mnist.data, 2, tiny_mnist.seed)
    assert counts.shape == (2, 10)
    assert counts.sum(dim=1).tolist() == [135, 135]
