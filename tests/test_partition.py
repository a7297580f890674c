import pytest
import torch

from fl_lightning.errors import ConfigError
from fl_lightning.partition import client_indices, iid_partitions, subsample, train_val_split


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


def test_clients_share_no_samples() -> None:
    seen: set[int] = set()
    for pid in range(4):
        train, val = client_indices(500, pid, 4, 0.1, max_train_samples=400, seed=0)
        both = set(train.tolist()) | set(val.tolist())
        assert seen.isdisjoint(both)
        seen |= both
    assert len(seen) == 400
    with pytest.raises(ConfigError, match="partition-id 4"):
        client_indices(500, 4, 4, 0.1, None, 0)
