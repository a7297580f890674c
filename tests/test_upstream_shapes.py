"""Modules shaped like upstream Lightning projects, federated unchanged by config alone.

Each shape is one that broke when users federated code nobody here wrote: Lightning's
basic examples (no `test_step`), lightning-hydra-template (a plateau scheduler on a
validation metric, nested `class_path` specs), the autoencoder example (a callback reading
`trainer.datamodule`), a GAN (manual optimization, two optimizers), gradient accumulation
with the client's own logs. Each federates in-process: two clients answer real train and
evaluate messages through the ClientApp, the server averages their weights, tests the
global model as the ServerApp does and checkpoints it, and the user's own class loads the
checkpoint back.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_lightning.client_app import make_client_app
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.errors import ClientError, ConfigError
from fl_lightning.server.evaluation import CentralEvaluator
from fl_lightning.server.federation import evaluation_fraction
from tests.conftest import DATA_ROOT
from tests.user_project import write_project

SHAPES = '''
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader


class Basic(pl.LightningModule):
    """Lightning's basic example: training and validation steps, no test_step."""

    def __init__(self, hidden: int = 16, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), on_step=True, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TrainOnly(pl.LightningModule):
    """Nothing but a training step."""

    def __init__(self):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Plateau(Basic):
    """lightning-hydra-template's default: ReduceLROnPlateau on the validation loss."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        scheduler = {"scheduler": plateau, "monitor": "val_loss"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class Gan(pl.LightningModule):
    """Manual optimization with two optimizers, as Lightning's GAN example."""

    def __init__(self, latent: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(latent, 784), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Flatten(), nn.Linear(784, 1))

    def training_step(self, batch, batch_idx):
        images, _ = batch
        g_opt, d_opt = self.optimizers()
        z = torch.randn(len(images), self.hparams.latent)
        fake = self.generator(z)
        ones, zeros = torch.ones(len(images), 1), torch.zeros(len(images), 1)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        real = F.binary_cross_entropy_with_logits(self.discriminator(images), ones)
        fake_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)
        d_loss = (real + fake_loss) / 2
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self):
        g = torch.optim.Adam(self.generator.parameters(), lr=2e-4)
        d = torch.optim.Adam(self.discriminator.parameters(), lr=2e-4)
        return [g, d]


class Mlp(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x):
        return self.layers(x)


class Composed(pl.LightningModule):
    """lightning-hydra-template's shape: the network and the optimizer come from the config."""

    def __init__(self, net: nn.Module, optimizer: OptimizerCallable):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return self.hparams.optimizer(self.parameters())


class SampleImages(Callback):
    """The autoencoder example's sampler: reads its images from trainer.datamodule."""

    def on_train_epoch_end(self, trainer, pl_module):
        images, _ = next(iter(DataLoader(trainer.datamodule.train, batch_size=4)))
        pl_module.log("sampled", float(len(images)))
'''

ROUNDS = 2


TRAINER = "trainer:\n  max_epochs: 1\n"


def _config(
    project: Path, model: str, *overrides: str, trainer: str = TRAINER, init_args: str = "{}"
) -> Config:
    """The shape federated by config alone: the user's classes by class_path, 2 clients."""
    (project / "config.yaml").write_text(f"""\
seed: 3
model:
  class_path: lit_digits.shapes.{model}
  init_args: {init_args}
data:
  class_path: lit_digits.core.Digits
  init_args: {{root: {DATA_ROOT}, limit: 200, batch_size: 16}}
  val_fraction: 0.2
federation:
  num_clients: 2
  num_rounds: {ROUNDS}
output:
  dir: {project / "run"}
{trainer}""")
    return load_config(project / "config.yaml", list(overrides))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The user's project (`lit_digits`, with the shapes above) as the working directory."""
    _forget_project()  # an earlier test's project of the same name, from another folder
    write_project(tmp_path)
    (tmp_path / "lit_digits" / "shapes.py").write_text(SHAPES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("_run_id", "_node_id", "_task_id"):  # what a Flower runtime stamps
        monkeypatch.setattr(TaskIdentity, name, 1)
    yield tmp_path
    _forget_project()  # the next test's project is another folder


def _forget_project() -> None:
    for name in [m for m in sys.modules if m == "lit_digits" or m.startswith("lit_digits.")]:
        del sys.modules[name]


def _send(
    app: ClientApp,
    message_type: str,
    state: dict[str, torch.Tensor],
    server_round: int,
    client: int,
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    message = Message(content=content, dst_node_id=client + 1, message_type=message_type)
    context = Context(
        run_id=1,
        node_id=client + 1,
        node_config={"partition-id": client, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    reply = app(message, context)
    assert not reply.has_error(), reply.error.reason
    return reply


def _mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}


def federate(cfg: Config) -> tuple[list[dict], dict[str, torch.Tensor], Path]:
    """`ROUNDS` rounds of both clients; each round's train, evaluate and central metrics,
    the last global weights, and the last checkpoint."""
    evaluator = CentralEvaluator(cfg)
    app = make_client_app(cfg)
    state = {k: v.detach().clone() for k, v in evaluator.model.state_dict().items()}
    rounds = []
    for server_round in range(1, ROUNDS + 1):
        replies = [_send(app, MessageType.TRAIN, state, server_round, c) for c in (0, 1)]
        state = _mean([r.content.array_records["arrays"].to_torch_state_dict() for r in replies])
        # As the server: no evaluate messages to a module without validation_step.
        asked = evaluation_fraction(cfg, evaluator.model) > 0
        evaluated = [
            _send(app, MessageType.EVALUATE, state, server_round, c) for c in (0, 1) if asked
        ]
        rounds.append(
            {
                "train": dict(replies[0].content.metric_records["metrics"]),
                "evaluate": dict(evaluated[0].content.metric_records["metrics"]) if asked else {},
                "central": evaluator.evaluate(state),
            }
        )
    checkpoint = Path(cfg.output.dir or ".") / "last.ckpt"
    evaluator.save_checkpoint(checkpoint)
    return rounds, state, checkpoint


def _restored(
    model: str, checkpoint: Path, state: dict[str, torch.Tensor], **kwargs: object
) -> None:
    """The user's own class loads the last checkpoint, and it holds the last global model."""
    cls = getattr(importlib.import_module("lit_digits.shapes"), model)
    loaded = cls.load_from_checkpoint(checkpoint, **kwargs).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k].float(), state[k]) for k in state)


def test_a_module_without_test_step_is_tested_with_its_validation_step(project: Path) -> None:
    rounds, state, checkpoint = federate(_config(project, "Basic"))
    for metrics in rounds:
        assert "train_loss" in metrics["train"]
        # Logged per step and per epoch: the name as logged, in every stage.
        assert "val_loss" in metrics["evaluate"] and "val_loss_epoch" not in metrics["evaluate"]
        assert set(metrics["central"]) == {"val_loss"}
    _restored("Basic", checkpoint, state)


def test_a_module_with_only_a_training_step_federates_without_central_tests(
    project: Path,
) -> None:
    rounds, state, checkpoint = federate(_config(project, "TrainOnly"))
    assert all("train_loss" in r["train"] and r["central"] == {} for r in rounds)
    _restored("TrainOnly", checkpoint, state)


def test_nested_class_specs_build_the_network_and_the_optimizer(project: Path) -> None:
    init_args = """
    net: {class_path: lit_digits.shapes.Mlp, init_args: {hidden: 12}}
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.5}}"""
    rounds, state, checkpoint = federate(_config(project, "Composed", init_args=init_args))
    assert all({"train/loss"} <= set(r["train"]) for r in rounds)
    assert all(set(r["central"]) == {"test/loss"} for r in rounds)
    assert state["net.layers.1.weight"].shape == (12, 784)
    mlp = importlib.import_module("lit_digits.shapes").Mlp(hidden=12)
    # As with the template in plain Lightning: `net` is not in the hyperparameters, and the
    # optimizer's partial is, which only a full (trusted) unpickling restores.
    _restored("Composed", checkpoint, state, net=mlp, weights_only=False)


def test_a_plateau_scheduler_on_a_validation_metric_steps_with_validation_in_fit(
    project: Path,
) -> None:
    rounds, state, checkpoint = federate(
        _config(project, "Plateau", "trainer.limit_val_batches=1.0")
    )
    assert all("val_loss" in r["train"] for r in rounds)  # validated inside fit
    _restored("Plateau", checkpoint, state)


def test_a_plateau_scheduler_without_validation_in_fit_says_how_to_turn_it_on(
    project: Path,
) -> None:
    cfg = _config(project, "Plateau")
    state = CentralEvaluator(cfg).model.state_dict()
    with pytest.raises(ClientError, match=r"trainer.limit_val_batches > 0"):
        _send(make_client_app(cfg), MessageType.TRAIN, state, 1, 0)


def test_a_callback_watching_a_validation_metric_needs_validation_in_fit(project: Path) -> None:
    extra = """\
trainer:
  max_epochs: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {monitor: val_loss}
"""
    with pytest.raises(ConfigError, match=r"trainer.callbacks\[0\].init_args.monitor"):
        _config(project, "Basic", trainer=extra)
    rounds, _, _ = federate(
        _config(project, "Basic", "trainer.limit_val_batches=1.0", trainer=extra)
    )
    assert all("val_loss" in r["train"] for r in rounds)


def test_a_callback_reads_the_datamodule_the_client_trains_with(project: Path) -> None:
    extra = """\
trainer:
  max_epochs: 1
  callbacks:
    - class_path: lit_digits.shapes.SampleImages
"""
    rounds, _, _ = federate(_config(project, "Basic", trainer=extra))
    assert all(r["train"]["sampled"] == 4.0 for r in rounds)


def test_manual_optimization_with_two_optimizers_federates(project: Path) -> None:
    rounds, state, checkpoint = federate(_config(project, "Gan"))
    assert all({"g_loss", "d_loss"} <= set(r["train"]) for r in rounds)
    assert all(r["central"] == {} for r in rounds)  # neither test_step nor validation_step
    _restored("Gan", checkpoint, state)


def test_stateful_clients_continue_two_optimizers_and_a_plateau_scheduler(project: Path) -> None:
    for model, validation in (("Gan", "0"), ("Plateau", "1.0")):
        federate(
            _config(
                project,
                model,
                "federation.stateful_clients=true",
                f"trainer.limit_val_batches={validation}",
                f"output.dir={project / model}",
            )
        )
        saved = torch.load(project / model / "client_state" / "0" / f"round_{ROUNDS}.pt")
        # 80 training samples in batches of 16: 5 steps of each optimizer a round.
        for optimizer in saved["optimizers"]:
            assert {float(s["step"]) for s in optimizer["state"].values()} == {5.0 * ROUNDS}
        assert len(saved["optimizers"]) == (2 if model == "Gan" else 1)
        # The plateau scheduler saw one epoch's validation loss a round: its count goes on.
        epochs = [s["last_epoch"] for s in saved["schedulers"]]
        assert epochs == ([] if model == "Gan" else [ROUNDS])


def test_client_logs_continue_across_rounds_with_gradient_accumulation(project: Path) -> None:
    federate(
        _config(
            project,
            "Basic",
            "trainer.accumulate_grad_batches=2",
            "trainer.log_every_n_steps=1",
            "output.client_logs=true",
        )
    )
    events = EventAccumulator(str(project / "run" / "tensorboard" / "clients" / "0"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train_loss")]
    # 80 training samples in batches of 16: 5 batches, 3 optimizer steps a round.
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert steps[-1] - steps[0] == len(steps) - 1, steps  # no gap between the rounds
