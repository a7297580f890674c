import subprocess
import sys
from pathlib import Path

import pytest

from fl_lightning.config.load import load_config
from fl_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "configs" / "mnist.yaml"


def load_error(overrides: list[str], path: Path = MNIST) -> str:
    """The one-line ConfigError that loading `path` with `overrides` raises."""
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.precision=bogus", "trainer.precision: 'bogus' is not a Lightning precision"),
        ("trainer.precision=8", "trainer.precision: 8 is not a Lightning precision"),
        ("trainer.accelerator=quantum", "trainer.accelerator: 'quantum' is not a Lightning"),
        ("trainer.strategy=bogus", "trainer.strategy: 'bogus' is not a Lightning strategy"),
        ("trainer.devices=0", "trainer.devices: 0 is not an int >= 1"),
        ("trainer.devices=[]", "trainer.devices: [] is not an int >= 1"),
        ("trainer.devices=abc", "trainer.devices: 'abc' is not an int >= 1"),
        ("trainer.devices=-1", "trainer.devices: -1 is not an int >= 1"),  # on the CPU
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches: must be a share"),
        ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches: must be a share"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches: is 0, so clients"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches: must be >= 1"),
    ],
)
def test_trainer_flags_are_checked_against_lightning(override: str, message: str) -> None:
    assert load_error([override]).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.precision=bf16-mixed"],
        ["trainer.precision=16"],
        ["trainer.precision='64'"],
        ["trainer.devices=auto"],  # one device on the CPU
        ["trainer.devices='1'"],
        ["trainer.strategy=single_device"],
        ["trainer.limit_train_batches=0.5"],
        ["trainer.limit_train_batches=3"],
        ["trainer.limit_train_batches=2.0"],
        ["trainer.accelerator=auto"],
        [
            "trainer.accelerator=gpu",
            "trainer.devices=[1]",
            "federation.client_resources.num_gpus=1",
        ],
        [
            "trainer.accelerator=cuda",
            "trainer.devices='3,'",
            "federation.client_resources.num_gpus=1",
        ],
    ],
)
def test_trainer_flags_lightning_accepts_still_load(overrides: list[str]) -> None:
    load_config(MNIST, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.accelerator=gpu", "trainer.devices=-1"], "trainer.devices: -1 trains each"),
        (["trainer.accelerator=gpu", "trainer.devices=auto"], "trainer.devices: 'auto' trains"),
        (["trainer.strategy=ddp_fork"], "trainer.strategy: 'ddp_fork' is not supported inside"),
        (["trainer.accelerator=gpu", "trainer.strategy=fsdp"], "trainer.strategy: 'fsdp' is"),
        (["trainer.strategy=deepspeed_stage_2"], "trainer.strategy: 'deepspeed_stage_2' is"),
        (["trainer.accelerator=auto", "trainer.devices=2"], "trainer.accelerator: auto with"),
        (["trainer.strategy=single_device", "trainer.devices=2"], "trainer.strategy: single_"),
    ],
)
def test_device_settings_a_client_cannot_run_are_refused_at_load(
    overrides: list[str], message: str
) -> None:
    gpu = (
        ["federation.client_resources.num_gpus=1"] if "trainer.accelerator=gpu" in overrides else []
    )
    assert load_error([*overrides, *gpu]).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.devices=2", "trainer.strategy=ddp"],
        ["trainer.devices=2"],  # several devices run as DDP whatever the strategy says
        ["trainer.devices=2", "trainer.strategy=ddp_spawn"],
        ["trainer.strategy=ddp"],  # one device: trains in the client's process
        ["trainer.accelerator=gpu", "trainer.devices=[0, 1]", "trainer.strategy=ddp"],
        ["trainer.devices=2", "trainer.strategy=ddp_find_unused_parameters_true"],
    ],
)
def test_several_devices_per_client_load(overrides: list[str]) -> None:
    gpu = (
        ["federation.client_resources.num_gpus=2"] if "trainer.accelerator=gpu" in overrides else []
    )
    load_config(MNIST, [*overrides, *gpu])


def test_default_trainer_flags_load_without_importing_lightning() -> None:
    # `fl-lightning run` loads the config before anything imports Lightning (seconds).
    code = (
        "import sys; from fl_lightning.config import load_config; "
        "load_config('configs/mnist.yaml', ['trainer.max_epochs=3']); "
        "print('lightning' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_evaluation_runs_on_the_first_device_the_trainer_names() -> None:
    from fl_lightning.models.trainer import one_device

    def on(devices: object) -> object:
        gpu = ["trainer.accelerator=gpu", "federation.client_resources.num_gpus=2"]
        return one_device(load_config(MNIST, [*gpu, f"trainer.devices={devices}"]).trainer)

    assert on("'2,3'") == [2] and on("[1, 0]") == [1] and on(1) == 1 and on(2) == 1
