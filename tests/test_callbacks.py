import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fl_lightning.client.callbacks import FedProx, RoundLearningRate


class Regression(L.LightningModule):
    """A user's module: a linear layer, SGD, an optional step-wise cosine schedule."""

    def __init__(self, proximal_mu: float = 0.0, cosine: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.proximal_mu = proximal_mu
        self.cosine = cosine
        self.anchor = [p.detach().clone() for p in self.parameters()]
        self.lrs: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.proximal_mu:  # FedProx written into the loss, as the paper states it
            distance = sum(
                (p - a).pow(2).sum() for p, a in zip(self.parameters(), self.anchor, strict=True)
            )
            loss = loss + 0.5 * self.proximal_mu * distance
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if not self.cosine:
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True) + 1), batch_size=8)


def _fit(model: Regression, *callbacks: L.Callback) -> Regression:
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, train_dataloaders=_loader())
    return model


def test_fedprox_callback_trains_as_the_proximal_term_in_the_loss() -> None:
    in_loss = _fit(Regression(proximal_mu=2.0))
    by_callback = _fit(Regression(), FedProx(mu=2.0))
    plain = _fit(Regression())
    for a, b in zip(in_loss.parameters(), by_callback.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(in_loss.parameters(), plain.parameters(), strict=True)
    ]
    assert max(moved) > 1e-3  # the term changed the training: the comparison means something


def test_fedprox_callback_adds_nothing_at_mu_zero() -> None:
    for a, b in zip(
        _fit(Regression(), FedProx(mu=0.0)).parameters(),
        _fit(Regression()).parameters(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cosine", [False, True])
def test_round_learning_rate_scales_every_step_of_the_modules_schedule(cosine: bool) -> None:
    full = _fit(Regression(cosine=cosine))
    half = _fit(Regression(cosine=cosine), RoundLearningRate(0.5))
    assert half.lrs == pytest.approx([lr / 2 for lr in full.lrs])
    assert (full.lrs[-1] < full.lrs[0]) == cosine  # the schedule itself still runs
