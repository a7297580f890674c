"""One client's data from the built-in datasets or any DataModule, and the server's test data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch

from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.data.loaders import central_test_loader, client_data, has_validation
from tests.conftest import REPO


def _class_path_twin(tiny_mnist: Config, data_root: Path) -> Config:
    """configs/mnist_class_path.yaml shrunk as `tiny_mnist` shrinks configs/mnist.yaml."""
    d = tiny_mnist.data
    return load_config(
        REPO / "configs" / "mnist_class_path.yaml",
        [
            f"data.init_args.root={data_root}",
            f"data.init_args.max_train_samples={d.max_train_samples}",
            f"data.init_args.max_test_samples={d.max_test_samples}",
            f"data.init_args.cache_dir={d.cache_dir}",
            f"federation.num_clients={tiny_mnist.federation.num_clients}",
        ],
    )


def _batches(cfg: Config, partition: int, seed: int) -> list[list[torch.Tensor]]:
    L.seed_everything(seed, verbose=False)  # as training.fit does before building the data
    data = client_data(cfg, partition, cfg.federation.num_clients, seed)
    assert data.val is not None
    return [list(batch) for loader in (data.train, data.val) for batch in loader]


def test_the_image_datamodule_by_class_path_serves_exactly_the_built_in_batches(
    tiny_mnist: Config, data_root: Path
) -> None:
    twin = _class_path_twin(tiny_mnist, data_root)
    for partition, seed in ((0, 11), (1, 12)):
        ours, theirs = _batches(tiny_mnist, partition, seed), _batches(twin, partition, seed)
        assert len(ours) == len(theirs) > 2
        for a, b in zip(ours, theirs, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert has_validation(twin) and has_validation(tiny_mnist)
    twin_test = [y for _, y in central_test_loader(twin)]
    assert sum(len(y) for y in twin_test) == tiny_mnist.data.max_test_samples


def test_a_plain_datamodule_is_cut_into_disjoint_clients(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.user_project import config_text, write_project

    write_project(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "config.yaml").write_text(config_text())
    cfg = load_config(tmp_path / "config.yaml", ["data.partition=dirichlet", "data.alpha=0.5"])
    shares = [client_data(cfg, k, 3, seed=k) for k in range(3)]
    indices = [set(s.train.dataset.indices) | set(s.val.dataset.indices) for s in shares]  # type: ignore[union-attr]
    assert sum(map(len, indices)) == len(set().union(*indices)) == 400  # disjoint, covering
    assert all(s.num_val == round((s.num_train + s.num_val) * 0.2) for s in shares)
    assert shares[0].train_labels is not None  # read from the samples: Subset has no targets
    site = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, partition="site"))
    assert client_data(site, 1, 3, seed=0).num_train == 320  # its own data, all of it
