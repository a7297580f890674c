"""`output.client_logs`: a client's own Lightning logging, one TensorBoard run per client.

Every round builds a fresh Trainer whose step starts at 0; the run's steps continue from
the client's earlier rounds instead: round r starts at (r - 1) x the round's optimizer
steps (`Trainer.estimated_stepping_batches`), so the curve of a client that sat a round
out keeps a gap there, and a resumed run writes where the killed one would have.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from fl_lightning.errors import ClientError


def client_log_dir(output_dir: str | None, partition_id: int) -> Path:
    """Where client `partition_id` writes its run: `<output.dir>/tensorboard/clients/<id>`."""
    if output_dir is None:
        raise ClientError(
            "output.client_logs: output.dir is not set, so the client does not know where "
            "the run writes; set output.dir to an absolute path"
        )
    return Path(output_dir) / "tensorboard" / "clients" / str(partition_id)


class ClientLogger(TensorBoardLogger):
    """A TensorBoard run of one client, its steps shifted by `offset` (see `ContinueSteps`)."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(
            save_dir=log_dir.parent, name="", version=log_dir.name, default_hp_metric=False
        )
        self.offset = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log as TensorBoardLogger does, at the step continued from earlier rounds."""
        super().log_metrics(metrics, None if step is None else step + self.offset)

    def log_hyperparams(
        self,
        params: dict[str, Any] | Namespace,
        metrics: dict[str, Any] | None = None,
        step: int | None = None,
    ) -> None:
        """Nothing: the run's config.yaml holds them; written each round they would repeat."""


class ContinueSteps(Callback):
    """Sets the round's `ClientLogger` offset once the Trainer knows its number of steps."""

    def __init__(self, logger: ClientLogger, server_round: int) -> None:
        self.logger = logger
        self.server_round = server_round

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Round r starts after r - 1 rounds of this round's length."""
        self.logger.offset = (self.server_round - 1) * int(trainer.estimated_stepping_batches)


def client_logging(
    output_dir: str | None, partition_id: int, server_round: int
) -> tuple[ClientLogger, ContinueSteps]:
    """The Trainer's logger for this client's round, and the callback that places its steps."""
    logger = ClientLogger(client_log_dir(output_dir, partition_id))
    return logger, ContinueSteps(logger, server_round)
