"""Ray settings of the Simulation Engine."""

import pytest

from fl_lightning.config import load_config
from fl_lightning.errors import ConfigError
from fl_lightning.simulation import backend_config


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
