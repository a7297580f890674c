"""Several devices inside one client: Lightning's DDP in processes spawned for one round.

A client's process is a Ray worker (simulation) or Flower's ClientApp process
(deployment), not a script Lightning can launch again, so `ddp`'s re-run of `sys.argv` is
out; DDP in *spawned* processes works in both. Each rank builds the client's data itself
(`RankData`: decoded datasets are memory-mapped, and mapped storage cannot be sent to a
child), Lightning's DistributedSampler shards it, gradients are all-reduced, and rank 0's
weights and metrics come back to the client's process, which replies once.

The ranks meet through a file in a private temporary folder, not a TCP port, so clients
training at the same time on one machine cannot collide; the processes end, and the
folder is removed, with the round.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import (
    _destroy_dist_connection,
    _init_dist_connection,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from fl_lightning.config.schema import Config

# Set while a round trains and inherited by its ranks, so that they can be found (tests).
MARKER = "FL_LIGHTNING_DDP"
# Variables set in the client's own process for the round (by us: MARKER, and TMPDIR so
# that the ranks' temporary files, Lightning's weights hand-over among them, land in the
# round's folder; by Lightning's launcher and DDP: the rest); all put back after.
_DDP_ENVIRONMENT = (
    MARKER,
    "TMPDIR",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
)


class ClientDDP(DDPStrategy):
    """DDP in spawned processes whose process group meets through `rendezvous` (a file)."""

    def __init__(self, rendezvous: Path, threads_per_rank: int, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)
        self.rendezvous = rendezvous
        self.threads_per_rank = threads_per_rank

    def setup_distributed(self) -> None:
        """In each rank: quiet Lightning, share the client's threads, join the group."""
        from fl_lightning.models.trainer import setup_lightning_process

        setup_lightning_process()  # the parent's settings, per rank
        torch.set_num_threads(self.threads_per_rank)
        reset_seed()  # the client's seed (PL_GLOBAL_SEED), as DDPStrategy does
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        # As DDPStrategy.setup_distributed, but the group meets at the file, not a port.
        kwargs: dict[str, Any] = {"timeout": self._timeout, "init_method": self.rendezvous.as_uri()}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device  # NCCL binds each rank to its GPU
        assert self.cluster_environment is not None  # set by Lightning's connector
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        # Lightning destroys an NCCL group at exit; a gloo group left to the interpreter's
        # teardown can abort the rank ("terminate called without an active exception").
        atexit.register(_destroy_dist_connection)


class RankData(pl.LightningDataModule):
    """The client's training data, built in each rank from what builds it in the client."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.partition = (partition_id, num_partitions, seed)

    def train_dataloader(self) -> DataLoader:
        """The client's loader; Lightning gives it a DistributedSampler for this rank."""
        from fl_lightning.data.loaders import client_data

        return client_data(self.cfg, *self.partition).train

    def val_dataloader(self) -> DataLoader | list:
        """The client's held-out data where it validates inside fit (trainer.limit_val_batches)."""
        from fl_lightning.data.loaders import client_data

        if not self.cfg.trainer.limit_val_batches:
            return []
        return client_data(self.cfg, *self.partition).val or []


@contextlib.contextmanager
def client_ddp(devices: int, **ddp_kwargs: Any) -> Iterator[ClientDDP]:
    """A `ClientDDP` for one round on `devices` ranks; its folder and variables go after.

    `ddp_kwargs` go to torch's DistributedDataParallel (e.g. find_unused_parameters).
    """
    saved = {name: os.environ.get(name) for name in _DDP_ENVIRONMENT}
    saved_tempdir = tempfile.tempdir
    folder = Path(tempfile.mkdtemp(prefix="fl-lightning-ddp-"))
    try:
        # multiprocessing's resource tracker serves the client's process for its whole
        # life, not one round: started before the marker, it does not carry it.
        resource_tracker.ensure_running()
        os.environ[MARKER] = os.environ["TMPDIR"] = str(folder)
        # torch's spawn leaves each crashed rank's traceback file in the parent's tempdir.
        tempfile.tempdir = str(folder)
        threads = max(1, torch.get_num_threads() // devices)
        yield ClientDDP(folder / "rendezvous", threads, **ddp_kwargs)
    finally:
        tempfile.tempdir = saved_tempdir
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)
