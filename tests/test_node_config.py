from pathlib import Path

import pytest

from fl_lightning.config.load import load_config
from fl_lightning.config.node_config import apply_node_config, config_from_run_config
from fl_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "configs" / "mnist.yaml"


def test_flower_run_config_names_the_yaml_and_overrides() -> None:
    cfg = config_from_run_config(
        {"config-path": str(MNIST), "overrides": "federation.num_rounds=3 seed=7"}
    )
    assert (cfg.federation.num_rounds, cfg.seed) == (3, 7)
    relative = config_from_run_config({"config-path": "configs/mnist.yaml", "overrides": ""})
    assert relative.model.name == "mnist_net"
    with pytest.raises(ConfigError, match="config-path"):
        config_from_run_config({})


def test_a_relative_config_path_is_found_in_this_checkout_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a SuperLink started elsewhere: not the working directory
    cfg = config_from_run_config({"config-path": "configs/mnist.yaml", "overrides": ""})
    assert cfg.model.name == "mnist_net"


def test_node_config_checks_the_partition_and_puts_the_trainer_on_its_gpus() -> None:
    cfg = load_config("configs/mnist.yaml", ["federation.num_clients=2"])
    assert apply_node_config(cfg, {"partition-id": 1, "num-partitions": 2}) == cfg
    on_gpus = apply_node_config(cfg, {"partition-id": 0, "num-partitions": 2, "gpus": "3"})
    assert (on_gpus.trainer.accelerator, on_gpus.trainer.devices) == ("gpu", [3])
    two = apply_node_config(cfg, {"partition-id": 0, "num-partitions": 2, "gpus": "1,3"})
    assert (two.trainer.accelerator, two.trainer.devices) == ("gpu", [1, 3])
    with pytest.raises(ConfigError, match="node-config 'partition-id' is 'one', not an integer"):
        apply_node_config(cfg, {"partition-id": "one", "num-partitions": 2})
    assert apply_node_config(cfg, {"partition-id": "1", "num-partitions": 2}) == cfg
    with pytest.raises(ConfigError, match="node-config 'num-partitions' is 5 but federation"):
        apply_node_config(cfg, {"partition-id": 0, "num-partitions": 5})
    with pytest.raises(ConfigError, match=r"node-config 'partition-id' is 2; it must be in 0\.\.1"):
        apply_node_config(cfg, {"partition-id": 2, "num-partitions": 2})
    with pytest.raises(ConfigError, match="node-config 'gpus': expected CUDA device indices"):
        apply_node_config(cfg, {"partition-id": 0, "num-partitions": 2, "gpus": "cuda:0"})
    with pytest.raises(ConfigError, match="node-config 'gpus': CUDA device indices are >= 0"):
        apply_node_config(cfg, {"partition-id": 0, "num-partitions": 2, "gpus": "0,-1"})
    with pytest.raises(ConfigError, match="node-config 'partition-id' is missing"):
        apply_node_config(cfg, {})


def test_run_config_overrides_with_an_unclosed_quote_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^run config 'overrides': No closing quotation"):
        config_from_run_config({"config-path": str(MNIST), "overrides": "seed='7"})


def test_a_site_sets_its_own_hardware_flags_checked_as_the_configs_are() -> None:
    cfg = load_config(MNIST, ["federation.num_clients=2"])
    node = {"partition-id": 1, "num-partitions": 2}
    site = apply_node_config(
        cfg, {**node, "accelerator": "gpu", "devices": 2, "precision": "bf16-mixed"}
    )
    t = site.trainer
    assert (t.accelerator, t.devices, t.precision) == ("gpu", 2, "bf16-mixed")
    assert apply_node_config(cfg, {**node, "devices": 2}).trainer.devices == 2
    assert apply_node_config(cfg, node).trainer == cfg.trainer  # the config's own
    with pytest.raises(ConfigError, match=r"node-config .*trainer.precision: 'bf17' is not"):
        apply_node_config(cfg, {**node, "precision": "bf17"})
    with pytest.raises(ConfigError, match=r"node-config .*trainer.strategy: 'fsdp' is not"):
        apply_node_config(cfg, {**node, "strategy": "fsdp"})
    # Values of the wrong type are refused as a config file's are, not passed to Lightning.
    with pytest.raises(ConfigError, match=r"node-config .*trainer.strategy: 123 is not"):
        apply_node_config(cfg, {**node, "strategy": 123})
    with pytest.raises(ConfigError, match=r"node-config .*trainer.precision: 16.0 is not"):
        apply_node_config(cfg, {**node, "precision": 16.0})
    with pytest.raises(ConfigError, match=r"node-config 'gpus' and 'devices' both choose"):
        apply_node_config(cfg, {**node, "gpus": "0", "devices": 2})
    private = load_config(
        MNIST,
        [
            "federation.num_clients=2",
            "privacy.mode=dp_sgd",
            "privacy.noise_multiplier=1",
            "trainer.gradient_clip_val=null",
        ],
    )
    with pytest.raises(ConfigError, match="DP-SGD trains each client on one device"):
        apply_node_config(private, {**node, "devices": 2})
