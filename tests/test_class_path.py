"""Classes a config names by class_path: each wrong one is one line naming the key, at load."""

from __future__ import annotations

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


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's project written into `tmp_path`, which is the working directory."""
    write_project(tmp_path)
    (tmp_path / "lit_digits" / "legacy.py").write_text(LEGACY)
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
