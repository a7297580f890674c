"""output.loggers: the user's own Lightning loggers get the server's rounds and the config."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from fl_lightning.cli import main
from fl_lightning.config.load import load_config
from fl_lightning.config.loggers import build_loggers, check_loggers
from fl_lightning.errors import ConfigError
from fl_lightning.server.rundir import create_run_dir
from fl_lightning.server.tracking import RunTracker
from tests.test_config import MNIST

CSV = "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {name: csv}}"


def test_a_csv_logger_gets_each_round_at_its_step_and_the_config(tmp_path: Path) -> None:
    cfg = load_config(MNIST, [f"output.dir={tmp_path / 'run'}", f"output.loggers=[{CSV}]"])
    run = create_run_dir(cfg)
    tracker = RunTracker(
        run, 2, cfg.to_dict(), console=False, loggers=build_loggers(cfg.output.loggers, run.path)
    )
    for server_round, accuracy in ((0, 0.1), (1, 0.5), (2, 0.8)):
        tracker.log_round(server_round, {"test/accuracy": accuracy, "seconds": 1.0})
    tracker.close()

    (version,) = (run.path / "csv").iterdir()  # written into the run directory
    with (version / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(int(r["step"]), float(r["test/accuracy"])) for r in rows] == [
        (0, 0.1), (1, 0.5), (2, 0.8)
    ]  # fmt: skip
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["federation.num_rounds"] == cfg.federation.num_rounds


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        (
            "{class_path: lightning.pytorch.loggers.MLFlowLogger}",
            r"output.loggers\[0\].class_path: MLFlowLogger needs a package that is not installed",
        ),
        (
            "{class_path: lightning.pytorch.callbacks.EarlyStopping}",
            r"output.loggers\[0\].class_path: .* is not a lightning.Logger",
        ),
        (
            "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {nme: x}}",
            r"output.loggers\[0\].init_args.nme: .*did you mean 'name'",
        ),
    ],
)
def test_a_logger_that_cannot_be_built_is_one_line_at_load(logger: str, message: str) -> None:
    pytest.importorskip("lightning")
    if "MLFlow" in logger:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("mlflow is installed here")
    cfg = load_config(MNIST, [f"output.loggers=[{logger}]"])  # as a client loads it
    with pytest.raises(ConfigError, match=message):
        check_loggers(cfg.output.loggers)  # as `fl-lightning run` checks it first


def test_fl_lightning_run_refuses_a_logger_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {nme: x}}"
    code = main(["run", str(MNIST), f"output.loggers=[{bad}]", f"output.dir={tmp_path / 'run'}"])
    assert code == 2
    assert "output.loggers[0].init_args.nme" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing claimed, nothing started
