import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from fl_lightning.config.schema import Config
from fl_lightning.data.datamodule import FederatedDataModule
from fl_lightning.models.networks import MLP
from fl_lightning.models.trainer import make_trainer


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(8, 1, 28, 28), torch.randint(10, (8,))


def test_cosine_schedule_decays_to_zero_over_the_fit(tiny_mnist: Config) -> None:
    L.seed_everything(0, verbose=False)
    model = MLP(scheduler="cosine", lr=0.1, optimizer="sgd")
    dm = FederatedDataModule(tiny_mnist.data, tiny_mnist.seed, 0, 2)
    trainer = make_trainer(tiny_mnist.trainer, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    (optimizer,) = trainer.optimizers
    assert optimizer.param_groups[0]["lr"] < 1e-3
    assert trainer.global_step == 2 * 5  # 135 samples in batches of 32, 2 epochs


def test_epoch_metrics_weigh_every_sample_once_and_reset_between_runs() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(13, 1, 28, 28), torch.randint(10, (13,))
    model = MLP()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    # 13 samples in batches of 8 and 5 (an unweighted mean of batch means would be off),
    # then only the last 5: without a reset the second run would still see all 13.
    for start in (0, 8):
        with torch.no_grad():
            logits = model(images[start:])
        expected_loss = torch.nn.functional.cross_entropy(logits, labels[start:]).item()
        expected_accuracy = (logits.argmax(1) == labels[start:]).float().mean().item()
        batches = DataLoader(TensorDataset(images[start:], labels[start:]), batch_size=8)
        (metrics,) = trainer.validate(model, dataloaders=batches, verbose=False)
        assert abs(metrics["val/loss"] - expected_loss) < 1e-5
        assert abs(metrics["val/accuracy"] - expected_accuracy) < 1e-6


def test_a_stage_builds_only_its_own_metrics() -> None:
    model = MLP()
    assert not [name for name, _ in model.named_children() if name.endswith("_metrics")]
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, dataloaders=DataLoader(TensorDataset(*batch())), verbose=False)
    built = [name for name, _ in model.named_children() if name.endswith("_metrics")]
    assert built == ["val_metrics"]
    assert "val_metrics" not in "".join(model.state_dict())  # checkpoints are unchanged
