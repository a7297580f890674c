"""Ray settings of the Simulation Engine."""

import subprocess
import sys
from pathlib import Path

import pytest

from fl_lightning.config.load import load_config
from fl_lightning.errors import ConfigError
from fl_lightning.run.simulation import backend_config

REPO = Path(__file__).resolve().parents[1]


def test_clients_reserve_their_resources_on_this_machine_or_a_cluster() -> None:
    local = backend_config(
        load_config("configs/mnist.yaml", ["federation.client_resources.num_cpus=2"])
    )
    assert local["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert "num_cpus" in local["init_args"] and "address" not in local["init_args"]
    # Connecting to a running cluster: Ray refuses num_cpus there, it counts the nodes itself.
    cluster = backend_config(load_config("configs/mnist.yaml", ["federation.ray_address=auto"]))
    assert cluster["init_args"]["address"] == "auto" and "num_cpus" not in cluster["init_args"]


def test_gpu_clients_must_reserve_a_share_of_a_gpu() -> None:
    gpu = ["trainer.accelerator=gpu", "federation.client_resources.num_gpus=0.2"]
    assert (
        backend_config(load_config("configs/mnist.yaml", gpu))["client_resources"]["num_gpus"]
        == 0.2
    )
    with pytest.raises(ConfigError, match=r"federation\.client_resources\.num_gpus: is 0"):
        backend_config(load_config("configs/mnist.yaml", ["trainer.accelerator=gpu"]))


def test_a_client_on_several_devices_reserves_one_cpu_or_gpu_for_each() -> None:
    two = ["trainer.devices=2", "trainer.strategy=ddp"]
    with pytest.raises(ConfigError, match=r"client_resources\.num_cpus: is 1 while trainer"):
        backend_config(load_config("configs/mnist.yaml", two))
    cpus = backend_config(
        load_config("configs/mnist.yaml", [*two, "federation.client_resources.num_cpus=2"])
    )
    assert cpus["client_resources"]["num_cpus"] == 2
    gpus = [*two, "trainer.accelerator=gpu", "federation.client_resources.num_gpus=1"]
    with pytest.raises(ConfigError, match=r"client_resources\.num_gpus: is 1 while trainer"):
        backend_config(load_config("configs/mnist.yaml", gpus))


WARM_UP = """
import os, sys
os.environ.pop("OMP_NUM_THREADS", None)  # as in a fresh Ray worker, before Ray sets it
from fl_lightning.config.load import load_config
from fl_lightning.run.simulation import _warm_up
_warm_up(load_config("configs/mnist.yaml", sys.argv[1:]))  # the first to import torch
import torch
from fl_lightning.data.partition import client_splits
print(torch.get_num_threads(), client_splits.cache_info().currsize)
"""


def test_worker_warm_up_loads_data_with_the_clients_thread_count(
    tiny_overrides: list[str],
) -> None:
    # torch fixes its thread count at import: the hook must import it as a 1-CPU client
    # (the default on this 2-core machine would be 2 threads per worker).
    overrides = [*tiny_overrides, "federation.client_resources.num_cpus=1"]
    result = subprocess.run(
        [sys.executable, "-c", WARM_UP, *overrides], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]  # one thread; the partitions are cached


def test_worker_warm_up_leaves_a_missing_dataset_to_the_first_message(tmp_path: Path) -> None:
    # The client's own error, reported by the strategy, says more than a dead Ray worker.
    result = subprocess.run(
        [sys.executable, "-c", WARM_UP, f"data.root={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] == "0"  # nothing cached
