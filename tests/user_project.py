"""A user's own Lightning project, as tests write it into a folder outside the package.

Nothing in it knows fl-lightning: a LightningModule with metric names unlike ours, a plain
DataModule (fl-lightning partitions it), a DataModule that loads one site's share itself
(`partition_id`, `num_partitions`), and a callback that logs a metric of its own.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import DATA_ROOT

MODULE = '''
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy
from torchvision import datasets, transforms


class LitDigits(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.val_hits = MulticlassAccuracy(10)
        self.test_hits = MulticlassAccuracy(10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("xent_fit", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_hits(logits, y)
        self.log("hits_val", self.val_hits)
        self.log("xent_val", F.cross_entropy(logits, y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_hits(logits, y)
        self.log("hits_test", self.test_hits)
        self.log("xent_test", F.cross_entropy(logits, y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.5)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def _mnist(root, train, limit):
    dataset = datasets.MNIST(root, train=train, download=False, transform=transforms.ToTensor())
    return Subset(dataset, range(limit))


class Digits(pl.LightningDataModule):
    """A plain DataModule: fl-lightning cuts its training set into clients."""

    def __init__(self, root: str, batch_size: int = 32, limit: int = 400):
        super().__init__()
        self.root, self.batch_size, self.limit = root, batch_size, limit

    def setup(self, stage):
        if stage == "fit":
            self.train = _mnist(self.root, True, self.limit)
        if stage == "test":
            self.test = _mnist(self.root, False, self.limit // 2)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=64)


class SiteDigits(pl.LightningDataModule):
    """One site's own data: the share `partition_id` of `num_partitions` (None: the server)."""

    def __init__(
        self,
        root: str,
        partition_id=None,
        num_partitions: int = 1,
        per_site: int = 150,
        batch_size: int = 16,
        shuffle: bool = True,
    ):
        super().__init__()
        self.root, self.partition_id, self.per_site = root, partition_id, per_site
        self.batch_size, self.shuffle = batch_size, shuffle

    def setup(self, stage):
        if self.partition_id is None:
            self.test = _mnist(self.root, False, 200)
            return
        start = self.partition_id * self.per_site
        full = datasets.MNIST(self.root, download=False, transform=transforms.ToTensor())
        self.train = Subset(full, range(start, start + self.per_site - 30))
        self.val = Subset(full, range(start + self.per_site - 30, start + self.per_site))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=64)


class EpochCounter(Callback):
    """A user's callback: logs how many epochs it saw."""

    def __init__(self, name: str = "epochs_seen"):
        self.name, self.seen = name, 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen += 1
        pl_module.log(self.name, float(self.seen))
'''

# The module's own metric names, as it logs them in training, validation and test.
TRAIN_METRICS = {"xent_fit", "epochs_seen"}
VAL_METRICS = {"hits_val", "xent_val"}
TEST_METRICS = {"hits_test", "xent_test"}


def write_project(folder: Path) -> Path:
    """Write the project's package `lit_digits` into `folder`; return the package's folder."""
    package = folder / "lit_digits"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core.py").write_text(MODULE)
    return package


def config_text(datamodule: str = "Digits", extra: str = "") -> str:
    """A config federating the project: its classes by class_path, our keys for the rest."""
    init_args = (
        f"{{root: {DATA_ROOT}, limit: 400}}" if datamodule == "Digits" else f"{{root: {DATA_ROOT}}}"
    )
    return f"""\
seed: 3
model:
  class_path: lit_digits.core.LitDigits
  init_args: {{hidden: 16}}
data:
  class_path: lit_digits.core.{datamodule}
  init_args: {init_args}
  val_fraction: 0.2
trainer:
  max_epochs: 1
  callbacks:
    - class_path: lit_digits.core.EpochCounter
federation:
  num_clients: 3
  num_rounds: 1
{extra}"""
