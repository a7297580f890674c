"""Shared fixtures: the real datasets beside the checkout, shrunk to a few hundred samples."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("FL_LIGHTNING_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared MNIST/CIFAR-10 copies; the suite needs them (no downloads here)."""
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.fail(
            f"test data not found at {DATA_ROOT}; set FL_LIGHTNING_DATA to the shared data folder"
        )
    return DATA_ROOT


@pytest.fixture()
def tiny_overrides(data_root: Path, tmp_path: Path) -> list[str]:
    """Overrides that shrink configs/mnist.yaml: 2 clients, 1 round, 1 epoch, 300/200 samples."""
    return [
        f"data.root={data_root}",
        "data.max_train_samples=300",
        "data.max_test_samples=200",
        "federation.num_clients=2",
        "federation.num_rounds=1",
        "trainer.max_epochs=1",
        f"output.dir={tmp_path / 'run'}",
    ]


@pytest.fixture()
def tiny_mnist(tiny_overrides: list[str]) -> Config:
    """configs/mnist.yaml shrunk by `tiny_overrides`."""
    return load_config(REPO / "configs" / "mnist.yaml", tiny_overrides)


@pytest.fixture(scope="session")
def tiny_image_folder(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class ImageFolder tree of real CIFAR-10 JPEGs: 20 train and 5 test images a class."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, count in (("train", 20), ("test", 5)):
        for name in ("airplane", "cat", "ship"):
            source = data_root / "cifar10" / split / name
            target = root / split / name
            target.mkdir(parents=True)
            for path in sorted(source.iterdir())[:count]:
                shutil.copy(path, target / path.name)
    return root
