import re
from pathlib import Path

import pytest

from fl_lightning.config import (
    apply_node_config,
    apply_override,
    config_from_run_config,
    load_config,
)
from fl_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "configs" / "mnist.yaml"


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_shipped_configs_keep_the_seed_setup(name: str) -> None:
    model = {"mnist": "mnist_net", "cifar10": "cifar10_net"}[name]
    for suffix in ("", "_seed_recipe"):
        cfg = load_config(REPO / "configs" / f"{name}{suffix}.yaml")
        assert cfg.model.name == model
        assert cfg.data.dataset == name
        assert (cfg.federation.num_clients, cfg.federation.num_rounds) == (5, 2)
        assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (2, 32)
        assert cfg.trainer.gradient_clip_val == 1.0
        assert cfg.output.experiment == f"{name}{suffix}"
    seed = load_config(REPO / "configs" / f"{name}_seed_recipe.yaml")
    assert (seed.optimizer.name, seed.optimizer.lr, seed.optimizer.weight_decay) == (
        "adamw",
        1e-3,
        1e-4,
    )
    assert (seed.data.augment, seed.model.label_smoothing) == ("none", 0.0)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)


def test_overrides_are_parsed_as_yaml_values() -> None:
    cfg = load_config(
        MNIST,
        [
            "federation.num_rounds=7",
            "optimizer.lr=5e-4",
            "data.download=true",
            "data.max_train_samples=null",
            "trainer.devices=[0, 1]",
            "federation.client_resources.num_gpus=0.5",
            "trainer.accelerator=gpu",
        ],
    )
    assert cfg.federation.num_rounds == 7
    assert cfg.optimizer.lr == 5e-4
    assert cfg.data.download is True
    assert cfg.data.max_train_samples is None
    assert cfg.trainer.devices == [0, 1]
    assert cfg.federation.client_resources.num_gpus == 0.5


def test_relative_data_root_is_resolved() -> None:
    cfg = load_config(MNIST, ["data.root=some/where"])
    assert Path(cfg.data.root).is_absolute()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "federation.num_round=2",
            "federation.num_round: unknown config key (did you mean 'federation.num_rounds'?)",
        ),
        ("federation.num_clients=0", "federation.num_clients: must be >= 1, got 0"),
        ("federation.num_clients=two", "federation.num_clients: 'two' is not an integer"),
        ("data.dataset=svhn", "data.dataset: 'svhn' is not one of"),
        ("data.val_fraction=1.0", "data.val_fraction: must be in [0, 1)"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs: 1.5 is not an integer"),
        ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
        ("data.download=yes please", "data.download: 'yes please' is not true or false"),
        ("model.name=cifar10_net", "model.name: cifar10_net takes inputs of shape (3, 32, 32)"),
        ("trainer.max_epochs.x=1", "trainer.max_epochs: is a value, not a section"),
        ("novel.key=1", "novel: unknown config key"),
        ("no_equals_sign", "is not KEY=VALUE"),
        ("data.dataset=imagefolder", "data.image_size: is required"),
        ("federation.client_resources.num_gpus=1", "trainer.accelerator: is 'cpu' while"),
        ("optimizer.ema_decay=1.0", "optimizer.ema_decay: must be in (0, 1) or null, got 1.0"),
        ("strategy.batchnorm=recompute", "strategy.batchnorm: recompute changes only BatchNorm"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(MNIST, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.batchnorm_batches=0"], "strategy.batchnorm_batches: must be >= 1"),
        (
            ["privacy.mode=client_dp", "privacy.noise_multiplier=1.0"],
            "strategy.batchnorm: recompute sends statistics of the clients' data",
        ),
        (
            ["secure_aggregation.enabled=true", "secure_aggregation.num_shares=5"],
            "strategy.batchnorm: recompute sends each client's statistics in the clear",
        ),
    ],
)
def test_recomputed_batchnorm_statistics_stay_out_of_private_runs(
    overrides: list[str], message: str
) -> None:
    cifar = REPO / "configs" / "cifar10.yaml"
    assert load_config(cifar, ["strategy.batchnorm=recompute"]).strategy.batchnorm == "recompute"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cifar, ["strategy.batchnorm=recompute", *overrides])


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: mnist\n   root: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is malformed \(line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


def test_apply_override_creates_missing_sections() -> None:
    raw: dict = {}
    apply_override(raw, "federation.client_resources.num_cpus=2")
    assert raw == {"federation": {"client_resources": {"num_cpus": 2}}}


def test_flower_run_config_names_the_yaml_and_overrides() -> None:
    cfg = config_from_run_config(
        {"config-path": str(MNIST), "overrides": "federation.num_rounds=3 seed=7"}
    )
    assert (cfg.federation.num_rounds, cfg.seed) == (3, 7)
    relative = config_from_run_config({"config-path": "configs/mnist.yaml", "overrides": ""})
    assert relative.model.name == "mnist_net"
    with pytest.raises(ConfigError, match="config-path"):
        config_from_run_config({})


def test_node_config_checks_the_partition_and_puts_the_trainer_on_its_gpus() -> None:
    cfg = load_config("configs/mnist.yaml", ["federation.num_clients=2"])
    assert apply_node_config(cfg, {"partition-id": 1, "num-partitions": 2}) == cfg
    on_gpus = apply_node_config(cfg, {"partition-id": 0, "num-partitions": 2, "gpus": "1,3"})
    assert (on_gpus.trainer.accelerator, on_gpus.trainer.devices) == ("gpu", [1, 3])
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
