"""Several devices inside one client: DDP in spawned processes, proven on CPU with gloo."""

from __future__ import annotations

import os
import tempfile
import threading
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from flwr.simulation import run_simulation
from torch.utils.data import DataLoader

from fl_lightning.client import training
from fl_lightning.client.ddp import MARKER
from fl_lightning.client_app import make_client_app
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config
from fl_lightning.models.build import build_model
from fl_lightning.run.processes import marked_processes
from fl_lightning.run.simulation import backend_config
from fl_lightning.server.rundir import create_run_dir
from fl_lightning.server_app import make_server_app
from tests.conftest import DATA_ROOT
from tests.test_end_to_end import read_metrics
from tests.user_project import config_text, write_project


def site_config(folder: Path, devices: int, batch_size: int) -> Config:
    """The user's project, its SiteDigits unshuffled, `devices` ranks of `batch_size` each."""
    text = config_text("SiteDigits").replace(
        "  init_args: {root:", f"  init_args: {{batch_size: {batch_size}, shuffle: false, root:"
    )
    (folder / "config.yaml").write_text(text)
    return load_config(
        folder / "config.yaml",
        [
            "federation.num_clients=2",
            f"trainer.devices={devices}",
            "trainer.strategy=ddp",
            "trainer.callbacks=[]",
        ],
    )


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_project(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned ranks inherit sys.path
    return tmp_path


def one_process_on_the_ranks_batches(
    cfg: Config, start: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """The client's round in one process, each step on the samples the 2 ranks shared.

    Lightning shuffles DDP's training data with a DistributedSampler seeded with the
    client's seed (PL_GLOBAL_SEED): rank r takes permutation[r::2]; a step of 2 ranks x 16
    samples is permutation[32k:32k+32], which this loader gives one process as one batch.
    """
    from lit_digits.core import SiteDigits  # type: ignore[import-not-found]

    site = SiteDigits(root=str(DATA_ROOT), partition_id=0, num_partitions=2)
    site.setup("fit")
    order = torch.randperm(len(site.train), generator=torch.Generator().manual_seed(seed))
    model = build_model(cfg)
    model.load_state_dict(start)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(site.train, batch_size=32, sampler=order.tolist()))
    return model.state_dict()


def test_two_gloo_processes_make_the_update_of_one_process_on_the_same_batches(
    project: Path,
) -> None:
    # DDP's gradient all-reduce averages the two ranks' mean losses over 16 samples each:
    # the mean loss over the step's 32 samples, as one process computes it.
    cfg = site_config(project, devices=2, batch_size=16)
    torch.manual_seed(0)
    start = build_model(cfg).state_dict()
    ddp = training.fit(cfg, start, partition_id=0, num_partitions=2, server_round=1)
    assert ddp.state_dict is not None
    assert ddp.num_examples == 120 and set(ddp.metrics) == {"xent_fit"}
    seed = training.client_seed(cfg.seed, server_round=1, partition_id=0)
    single = one_process_on_the_ranks_batches(cfg, start, seed)
    moved = max((single[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-2  # the round trained
    for key in start:
        torch.testing.assert_close(ddp.state_dict[key], single[key], rtol=1e-4, atol=1e-5)
    # The ranks are gone, and the client's process has its environment back.
    assert marked_processes(None, MARKER) == []
    assert MARKER not in os.environ and "MASTER_PORT" not in os.environ
    # A second round in the same process starts clean.
    again = training.fit(cfg, ddp.state_dict, partition_id=1, num_partitions=2, server_round=2)
    assert again.num_examples == 120 and again.metrics["xent_fit"] > 0


CRASH = """
from lightning.pytorch.callbacks import Callback


class CrashOnRankOne(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1:
            raise RuntimeError("rank 1 broke")
"""


def test_a_rank_that_crashes_fails_the_clients_round_and_leaves_nothing_behind(
    project: Path,
) -> None:
    (project / "crash.py").write_text(CRASH)
    cfg = site_config(project, devices=2, batch_size=16)
    crashing = load_config(
        project / "config.yaml",
        [
            "federation.num_clients=2",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.callbacks=[{class_path: crash.CrashOnRankOne}]",
        ],
    )
    before, environment = ddp_folders(), dict(os.environ)
    with pytest.raises(Exception, match="rank 1 broke"):
        training.fit(crashing, build_model(cfg).state_dict(), 0, 2, server_round=1)
    assert marked_processes(None, MARKER) == [] and ddp_folders() == before
    ours = {k: v for k, v in os.environ.items() if not k.startswith("PL_")}  # seed_everything's
    assert ours == {k: v for k, v in environment.items() if not k.startswith("PL_")}
    assert not list(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*"))  # in the folder


class RankWatch(threading.Thread):
    """Every 50 ms, the DDP ranks alive on this machine (spawned, with the marker), by the
    client process that started them."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.most_clients = 0  # the most client processes seen training DDP at once
        self.most_ranks = 0  # the most ranks one client process was seen running
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            ranks = {pid: _parent(pid) for pid in marked_processes(None, MARKER) if _is_rank(pid)}
            # A rank's own child, forked and not yet exec'd, looks like a rank: not counted.
            clients = Counter(parent for parent in ranks.values() if parent not in ranks)
            self.most_clients = max(self.most_clients, len(clients))
            self.most_ranks = max(self.most_ranks, *clients.values(), 0)

    def __enter__(self) -> RankWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def _is_rank(pid: int) -> bool:
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def ddp_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("fl-lightning-ddp-*"))


def test_two_clients_train_on_two_processes_each_at_the_same_time_round_after_round(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        "configs/mnist.yaml",
        [
            f"data.root={data_root}",
            "data.max_train_samples=400",
            "data.max_test_samples=200",
            "federation.num_clients=2",
            "federation.num_rounds=2",
            "trainer.max_epochs=1",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.precision=bf16-mixed",  # mixed precision on the clients
            "federation.client_resources.num_cpus=2",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    backend = backend_config(cfg)
    # Ray counts 4 CPUs on these 2 cores: both clients (2 CPUs each) train at once.
    backend["init_args"]["num_cpus"] = 4
    before = ddp_folders()
    run = create_run_dir(cfg)
    with RankWatch() as watch:
        run_simulation(
            server_app=make_server_app(cfg, run, console=False),
            client_app=make_client_app(cfg),
            num_supernodes=2,
            backend_config=backend,
        )
    records = read_metrics(run.path)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["failures"] == 0 and r["rejected"] == 0 for r in records[1:])
    assert all(r["train/loss"] is not None for r in records[1:])
    # 2 clients x 2 ranks at once, each client's round in a process group of its own
    assert (watch.most_clients, watch.most_ranks) == (2, 2)
    assert marked_processes(None, MARKER) == [] and ddp_folders() == before
    # The server aggregates and checkpoints in the model's own dtypes.
    state = torch.load(run.path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
