import re
from pathlib import Path

import pytest

from fl_lightning.config.load import load_config
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
            "trainer.devices=[1]",
            "federation.client_resources.num_gpus=0.5",
            "trainer.accelerator=gpu",
        ],
    )
    assert cfg.federation.num_rounds == 7
    assert cfg.optimizer.lr == 5e-4
    assert cfg.data.download is True
    assert cfg.data.max_train_samples is None
    assert cfg.trainer.devices == [1]
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
        ("trainer.max_epochs.x=1", "trainer.max_epochs: is a value, not a section"),
        ("novel.key=1", "novel: unknown config key"),
        ("no_equals_sign", "is not KEY=VALUE"),
        ("data.dataset=imagefolder", "data.image_size: is required"),
        ("federation.client_resources.num_gpus=1", "trainer.accelerator: is 'cpu' while"),
        ("optimizer.ema_decay=1.0", "optimizer.ema_decay: must be in (0, 1) or null, got 1.0"),
        ("evaluation.every_n_rounds=0", "evaluation.every_n_rounds: must be >= 1, got 0"),
        ("evaluation.max_samples=0", "evaluation.max_samples: must be >= 1 or null, got 0"),
        ("evaluation.every_n_round=2", "(did you mean 'evaluation.every_n_rounds'?)"),
        (
            "privacy.max_physical_batch_size=64",
            "privacy.max_physical_batch_size: splits DP-SGD's batches; privacy.mode is none",
        ),
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


# --- Issue #18, item 10: bad input refused at load, one line naming the key -------------


ONE_GPU = ["federation.client_resources.num_gpus=1"]


def load_error(overrides: list[str], path: Path = MNIST) -> str:
    """The one-line ConfigError that loading `path` with `overrides` raises."""
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", ["data.root", "data.cache_dir"])
def test_a_home_folder_of_an_unknown_user_names_the_key(key: str) -> None:
    message = load_error([f"{key}=~nosuchuser/x"])
    assert message.startswith(f"{key}: cannot expand '~nosuchuser/x': there is no user")


@pytest.mark.parametrize(
    "override",
    [
        "strategy.eta=.nan",
        "strategy.tau=.inf",
        "optimizer.lr=-.inf",
        "federation.round_timeout=.inf",
        "privacy.delta=nan",  # a string YAML leaves alone, read as a float
        "data.noise.std=1e999",
        f"optimizer.lr={10**400}",  # an integer beyond float's range
    ],
)
def test_non_finite_numbers_are_refused_anywhere(override: str) -> None:
    key = override.split("=")[0]
    assert load_error([override]).startswith(f"{key}: must be a finite number, got ")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.eta=0", "strategy.eta: must be > 0"),
        ("strategy.tau=0", "strategy.tau: must be > 0"),
        ("strategy.beta_1=5", "strategy.beta_1: must be in [0, 1), got 5.0"),
        ("strategy.beta_1=-0.1", "strategy.beta_1: must be in [0, 1)"),
        ("strategy.beta_2=1", "strategy.beta_2: must be in [0, 1), got 1.0"),
        ("strategy.server_learning_rate=0", "strategy.server_learning_rate: must be > 0"),
        ("strategy.server_momentum=1", "strategy.server_momentum: must be in [0, 1)"),
    ],
)
def test_strategy_parameters_are_checked_against_their_ranges(override: str, message: str) -> None:
    assert load_error([override]).startswith(message)


def test_krum_needs_more_than_two_f_plus_two_clients() -> None:
    krum = ["strategy.name=krum", "federation.num_clients=5"]
    assert load_config(MNIST, [*krum, "strategy.num_malicious_clients=1"])
    message = load_error([*krum, "strategy.num_malicious_clients=2"])
    assert message.startswith("strategy.num_malicious_clients: krum tolerates 2 malicious")


def test_lightning_flag_lists_are_lightnings_own() -> None:
    # The accepted values come from Lightning, not from a list this project keeps.
    from lightning.fabric.utilities.seed import max_seed_value
    from lightning.pytorch.strategies import StrategyRegistry

    from fl_lightning.config.validate import MAX_SEED

    assert max_seed_value == MAX_SEED
    assert "ddp" in StrategyRegistry.available_strategies()
    assert load_config(MNIST, [f"seed={MAX_SEED}"]).seed == MAX_SEED
    assert load_error([f"seed={MAX_SEED + 1}"]).startswith("seed: must be in [0, 2**32 - 1]")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:\n  dataset: mnist\ndata:\n  root: x\n", "data is written twice (lines 1 and 3)"),
        (
            "data:\n  root: a\n  batch_size: 8\n  root: b\n",
            "data.root is written twice (lines 2 and 4)",
        ),
        ("seed: 1\nseed: 2\n", "seed is written twice (lines 1 and 2)"),
        (
            "federation:\n  client_resources:\n    num_cpus: 1\n    num_cpus: 2\n",
            "federation.client_resources.num_cpus is written twice (lines 3 and 4)",
        ),
    ],
)
def test_a_key_written_twice_in_a_yaml_file_is_an_error(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    error = load_error([], path)
    assert message in error and "keep one" in error


def test_yaml_merge_keys_may_still_override(tmp_path: Path) -> None:
    merged = tmp_path / "merged.yaml"
    merged.write_text("federation:\n  <<: {num_rounds: 3, num_clients: 4}\n  num_rounds: 1\n")
    cfg = load_config(merged)
    assert (cfg.federation.num_rounds, cfg.federation.num_clients) == (1, 4)


def test_an_override_value_with_a_key_written_twice_is_an_error() -> None:
    message = load_error(["data={root: a, root: b}"])
    assert "override 'data': root is written twice" in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data=[1, 2]", "data: must be a section (mapping of keys), not [1, 2]"),
        ("trainer=5", "trainer: must be a section (mapping of keys), not 5"),
        (f"data.max_train_samples={2**64}", "data.max_train_samples: 18446744073709551616 is too"),
        ("data.root=a\0b", "data.root: 'a\\x00b' contains a NUL character"),
        ("data.channels=true", "data.channels: True is not one of 1, 3"),
        ("data.channels=3.0", "data.channels: 3.0 is not one of 1, 3"),
        ("a\nb=1", "'a\\nb': unknown config key"),
    ],
)
def test_other_values_of_the_wrong_kind_name_the_key(override: str, message: str) -> None:
    assert load_error([override]).startswith(message)


def test_an_unreadable_config_file_is_one_line(tmp_path: Path) -> None:
    assert "cannot be read" in load_error([], tmp_path)  # a folder
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "is not UTF-8 text" in load_error([], binary)
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in load_error([], deep)


@pytest.mark.parametrize("key", ["output.dir", "output.root", "output.experiment", "data.root"])
def test_a_name_longer_than_file_systems_allow_is_refused_at_load(key: str) -> None:
    long = "x" * 300
    value = long if key == "output.experiment" else f"/tmp/{long}/run"
    message = load_error([f"{key}={value}"])
    assert message.startswith(f"{key}: has a folder or file name of 300 bytes")
