"""Layout of a run directory: what each file is called and where it lives."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from fl_lightning.config import Config
from fl_lightning.errors import ConfigError


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's outputs."""

    path: Path

    @property
    def config(self) -> Path:
        """The resolved config the run used."""
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON object per round."""
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """Table III-style markdown summary."""
        return self.path / "summary.md"

    @property
    def curves(self) -> Path:
        """Accuracy and loss per round, as a PNG."""
        return self.path / "curves.png"

    @property
    def label_histogram(self) -> Path:
        """Per-client training-label counts (JSON; a PNG beside it)."""
        return self.path / "label_histogram.json"

    @property
    def clients(self) -> Path:
        """Per-client before/after-FL accuracies."""
        return self.path / "clients.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files."""
        return self.path / "tensorboard"

    @property
    def stopped(self) -> Path:
        """Why the run ended before its last round, when it did so by design (privacy budget)."""
        return self.path / "stopped.txt"

    def last_round(self) -> int:
        """The last round recorded in metrics.jsonl (-1 if none)."""
        if not self.metrics.exists():
            return -1
        lines = self.metrics.read_text().splitlines()
        return int(json.loads(lines[-1])["round"]) if lines else -1

    def checkpoint(self, name: str) -> Path:
        """`checkpoints/<name>.ckpt` (round_<k> or last)."""
        return self.path / "checkpoints" / f"{name}.ckpt"


def run_dir_path(cfg: Config) -> Path:
    """Where a run of `cfg` writes: `output.dir`, else `<root>/<experiment>/<timestamp>`."""
    if cfg.output.dir is not None:
        return Path(cfg.output.dir)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path(cfg.output.root) / (cfg.output.experiment or "run") / stamp


def check_free(path: Path) -> None:
    """Refuse a directory that already holds a run, so no earlier results are overwritten."""
    run = RunDir(path)
    if run.metrics.exists() or run.config.exists():
        raise ConfigError(
            f"output.dir: {path} already holds a run; choose another directory or remove it"
        )


def create_run_dir(cfg: Config) -> RunDir:
    """Make the run directory (see `run_dir_path`) and save the resolved config in it."""
    path = run_dir_path(cfg)
    check_free(path)
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path)
    run.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run
