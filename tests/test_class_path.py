"""Classes a config names by class_path: each wrong one is one line naming the key, at load."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_lightning.config.class_path import ClassSpec, check_init_args, import_class, instantiate
from fl_lightning.config.load import load_config
from fl_lightning.errors import ConfigError
from tests.conftest import REPO
from tests.user_project import config_text, write_project

HALF_SITE = """

class HalfSite(Digits):
    def __init__(self, root: str, partition_id: int = 0, limit: int = 400):
        super().__init__(root, limit=limit)
"""

LEGACY = """
import pytorch_lightning as pl


class OldStyle(pl.LightningModule):
    pass
"""

# A module built from parts, as LightningCLI and lightning-hydra-template configure one: a
# network (an instance), an optimizer and a scheduler (factories the module calls), heads
# (a list of instances) and an activation (a callable that is not a factory: an instance).
COMPOSED = """
from typing import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU())


class Composed(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: LRSchedulerCallable | None = None,
        heads: list[nn.Module] = (),
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
    ):
        super().__init__()
        self.net, self.heads = net, nn.ModuleList(heads)
        self.optimizer, self.scheduler, self.activation = optimizer, scheduler, activation

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}
"""
COMPOSED_INIT_ARGS = (
    "model.init_args={"
    "net: {class_path: lit_digits.composed.Net, init_args: {hidden: 64}}, "
    "optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.01}}, "
    "scheduler: {class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 3}}, "
    "heads: [{class_path: torch.nn.Linear, init_args: {in_features: 64, out_features: 10}}], "
    "activation: {class_path: torch.nn.ReLU}}"
)
COMPOSED_OVERRIDES = ["model.class_path=lit_digits.composed.Composed", COMPOSED_INIT_ARGS]


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's project written into `tmp_path`, which is the working directory."""
    write_project(tmp_path)
    (tmp_path / "lit_digits" / "legacy.py").write_text(LEGACY)
    (tmp_path / "lit_digits" / "composed.py").write_text(COMPOSED)
    with (tmp_path / "lit_digits" / "core.py").open("a") as core:
        core.write(HALF_SITE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # Another test's `lit_digits` (another folder) may be imported already: use this one.
    for name in [m for m in sys.modules if m.split(".")[0] == "lit_digits"]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


BAD = {
    "a module that does not import": (
        "model.class_path=lit_digits.nowhere.Net",
        r"^model\.class_path: cannot import 'lit_digits\.nowhere'",
    ),
    "a class the module lacks": (
        "model.class_path=lit_digits.core.LitDigit",
        r"^model\.class_path: 'lit_digits\.core' has no class 'LitDigit' \(did you mean "
        r"lit_digits\.core\.LitDigits\?\)",
    ),
    "not a LightningModule": (
        "model.class_path=lit_digits.core.Digits",
        r"^model\.class_path: lit_digits\.core\.Digits is not a lightning\.LightningModule$",
    ),
    "a pytorch_lightning module": (
        "model.class_path=lit_digits.legacy.OldStyle",
        r"subclasses the separate `pytorch_lightning` package: import from `lightning\.pytorch`",
    ),
    "an init arg the constructor lacks": (
        "model.init_args.hiden=3",
        r"^model\.init_args\.hiden: LitDigits\.__init__ takes no argument 'hiden' "
        r"\(did you mean 'hidden'\?\)",
    ),
    "a DataModule that is not one": (
        "data.class_path=lit_digits.core.LitDigits",
        r"^data\.class_path: lit_digits\.core\.LitDigits is not a lightning\.LightningDataModule",
    ),
    "a missing DataModule argument": (
        "data.init_args={}",
        r"^data\.init_args: Digits\(missing a required argument: 'root'\)",
    ),
    "a DataModule taking only one partition argument": (
        "data.class_path=lit_digits.core.HalfSite",
        r"^data\.class_path: lit_digits\.core\.HalfSite takes partition_id but not "
        r"num_partitions",
    ),
    "an unknown Trainer keyword": (
        "trainer.max_epoch=2",
        r"^trainer\.max_epoch: not a lightning\.Trainer keyword \(did you mean "
        r"'trainer\.max_epochs'\?\)",
    ),
    "a Trainer keyword fl-lightning owns": (
        "trainer.logger=true",
        r"^trainer\.logger: is set by fl-lightning",
    ),
    "a Trainer value Lightning refuses": (
        "trainer.profiler=bogus",
        r"^trainer\.profiler: lightning\.Trainer refused them",
    ),
    "a callback that does not import": (
        "trainer.callbacks=[{class_path: lit_digits.core.Missing}]",
        r"^trainer\.callbacks\[0\]\.class_path: 'lit_digits\.core' has no class 'Missing'",
    ),
    "a callback that is not one": (
        "trainer.callbacks=[{class_path: lit_digits.core.Digits}]",
        r"^trainer\.callbacks\[0\]\.class_path: lit_digits\.core\.Digits is not a "
        r"lightning\.Callback",
    ),
    "a checkpoint callback": (
        "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint}]",
        r"^trainer\.callbacks\[0\]\.class_path: .*the server checkpoints the global model",
    ),
    "a callback value its constructor refuses": (
        "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.EarlyStopping, "
        "init_args: {monitor: xent_val, mode: sideways}}]",
        r"^trainer\.callbacks\[0\]\.init_args: EarlyStopping refused them: .*sideways",
    ),
    "a built-in optimizer key with a module of one's own": (
        "optimizer.lr=0.1",
        r"^optimizer\.lr: configures the built-in optimizer only.*configure_optimizers",
    ),
    "a built-in data key with a DataModule": (
        "data.batch_size=8",
        r"^data\.batch_size: configures the built-in data only.*data\.init_args",
    ),
    "a built-in model with a DataModule": (
        "model={name: mlp}",
        r"^model\.name: the built-in mlp trains on the built-in datasets",
    ),
}


@pytest.mark.parametrize("override", [k for k, (_, m) in BAD.items() if m], ids=str)
def test_each_bad_class_setting_is_one_line_naming_the_key(project: Path, override: str) -> None:
    item, message = BAD[override]
    config = project / "config.yaml"
    config.write_text(config_text())
    with pytest.raises(ConfigError, match=message):
        load_config(config, [item])


def test_nested_specs_build_instances_and_optimizer_factories(project: Path) -> None:
    import torch

    from fl_lightning.models.build import build_model

    config = project / "config.yaml"
    config.write_text(config_text())
    cfg = load_config(config, COMPOSED_OVERRIDES)
    model = build_model(cfg)
    assert type(model.net).__name__ == "Net" and model.net.layers[1].out_features == 64
    assert isinstance(model.heads[0], torch.nn.Linear) and model.heads[0].out_features == 10
    assert isinstance(model.activation, torch.nn.ReLU)  # a callable, not a factory of one
    assert isinstance(model.optimizer, functools.partial)
    built = model.configure_optimizers()
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.01
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 3


def test_nested_specs_survive_the_runs_round_trip(project: Path) -> None:
    import yaml

    from fl_lightning.config.load import config_from_dict

    config = project / "config.yaml"
    config.write_text(config_text())
    cfg = load_config(config, COMPOSED_OVERRIDES)
    written = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert written["model"]["init_args"]["net"] == {
        "class_path": "lit_digits.composed.Net",
        "init_args": {"hidden": 64},
    }
    assert config_from_dict(written) == cfg
    assert hash(config_from_dict(written)) == hash(cfg)


NESTED_BAD = {
    "a typo in nested init_args": (
        "model.init_args.net.init_args.hiden=3",
        r"^model\.init_args\.net\.init_args\.hiden: Net\.__init__ takes no argument 'hiden' "
        r"\(did you mean 'hidden'\?\)$",
    ),
    "a nested class the module lacks": (
        "model.init_args.net.class_path=lit_digits.composed.Nett",
        r"^model\.init_args\.net\.class_path: 'lit_digits\.composed' has no class 'Nett' "
        r"\(did you mean lit_digits\.composed\.Net\?\)$",
    ),
    "a typo in an optimizer's init_args": (
        "model.init_args.optimizer.init_args.learning_rate=0.1",
        r"^model\.init_args\.optimizer\.init_args\.learning_rate: Adam\.__init__ takes no "
        r"argument 'learning_rate'",
    ),
    "a list item missing an argument": (
        "model.init_args.heads=[{class_path: torch.nn.Linear, init_args: {in_features: 64}}]",
        r"^model\.init_args\.heads\[0\]\.init_args: Linear\(missing a required argument: "
        r"'out_features'\)$",
    ),
    "a misspelt init_args key": (
        "model.init_args.net={class_path: lit_digits.composed.Net, init_arg: {hidden: 3}}",
        r"^model\.init_args\.net\.init_arg: did you mean 'init_args'\?",
    ),
    "a callback's nested class that does not import": (
        "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.LambdaCallback, "
        "init_args: {on_fit_start: {class_path: lit_digits.nowhere.Hook}}}]",
        r"^trainer\.callbacks\[0\]\.init_args\.on_fit_start\.class_path: cannot import "
        r"'lit_digits\.nowhere'",
    ),
}


@pytest.mark.parametrize("case", NESTED_BAD, ids=str)
def test_each_bad_nested_class_fails_at_load_naming_the_full_key(project: Path, case: str) -> None:
    item, message = NESTED_BAD[case]
    config = project / "config.yaml"
    config.write_text(config_text())
    with pytest.raises(ConfigError, match=message):
        load_config(config, [*COMPOSED_OVERRIDES, item])


def test_a_partition_argument_in_init_args_is_refused(project: Path) -> None:
    config = project / "config.yaml"
    config.write_text(config_text("SiteDigits"))
    with pytest.raises(ConfigError, match=r"^data\.init_args: partition_id is set by fl-lightning"):
        load_config(config, ["data.init_args.partition_id=0"])


def test_the_good_config_loads_and_names_its_classes(project: Path) -> None:
    config = project / "config.yaml"
    config.write_text(config_text())
    cfg = load_config(config)
    assert (cfg.model.name, cfg.model.class_path) == (None, "lit_digits.core.LitDigits")
    assert cfg.to_dict()["trainer"]["callbacks"] == [
        {"class_path": "lit_digits.core.EpochCounter", "init_args": {}}
    ]


def test_instantiate_turns_a_constructors_refusal_into_one_line(project: Path) -> None:
    spec = ClassSpec("lit_digits.core.LitDigits", {"hidden": "many"})
    import lightning.pytorch as pl

    with pytest.raises(ConfigError, match=r"^model\.init_args: LitDigits refused them: "):
        instantiate(spec, "model", pl.LightningModule)


def test_check_init_args_accepts_what_the_constructor_binds() -> None:
    class Net:
        def __init__(self, width: int, depth: int = 2, **extra: object) -> None: ...

    check_init_args(Net, {"width": 3, "anything": 1}, "model", given=set())
    with pytest.raises(ConfigError, match="missing a required argument: 'width'"):
        check_init_args(Net, {}, "model", given=set())
    assert import_class("collections.OrderedDict", "k").__name__ == "OrderedDict"


def test_a_datamodule_without_test_data_stops_the_cli_before_any_process(project: Path) -> None:
    (project / "lit_digits" / "no_test.py").write_text(
        "import lightning.pytorch as pl\n\n"
        "class NoTest(pl.LightningDataModule):\n"
        "    def __init__(self, root: str, limit: int = 0):\n"
        "        super().__init__()\n"
    )
    config = project / "config.yaml"
    config.write_text(config_text().replace("core.Digits", "no_test.NoTest"))
    result = subprocess.run(
        [sys.executable, "-m", "fl_lightning.cli", "run", str(config)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "test_dataloader" in lines[0], result.stderr
    assert not (project / "runs").exists()  # nothing written


def test_a_class_path_config_as_a_run_writes_it_loads_back_equal(project: Path) -> None:
    import yaml

    from fl_lightning.config.load import config_from_dict

    config = project / "config.yaml"
    config.write_text(config_text("SiteDigits"))
    cfg = load_config(config, ["trainer.log_every_n_steps=7", "trainer.gradient_clip_val=0.5"])
    written = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))  # as config.yaml holds it
    assert "name" not in written["model"] and "root" not in written["data"]
    assert written["trainer"]["log_every_n_steps"] == 7  # extras flat, as users write them
    assert config_from_dict(written) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model={name: null}", r"^model\.name: is null: name a built-in model"),
        ("data.partition=site", r"^data\.partition: site is set by a SuperNode"),
    ],
)
def test_settings_only_a_supernode_or_a_class_path_may_leave_out(
    override: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "mnist.yaml", [override])
