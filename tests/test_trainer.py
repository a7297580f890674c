"""fl_lightning.models.trainer: the process set-up every Trainer of a worker relies on."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.utilities import registry

from fl_lightning.models.trainer import _read_entry_points_once


@pytest.fixture
def callback_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package whose entry point gives every Trainer a callback, as plugins do."""
    (tmp_path / "fake_plugin.py").write_text(
        textwrap.dedent(
            """
            from lightning.pytorch.callbacks import Callback

            class PluginCallback(Callback):
                pass

            def factory():
                return [PluginCallback()]
            """
        )
    )
    info = tmp_path / "fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[lightning.pytorch.callbacks_factory]\nfake = fake_plugin:factory\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def _plugin_callbacks(trainer: L.Trainer) -> list[object]:
    return [c for c in trainer.callbacks if type(c).__name__ == "PluginCallback"]


def test_entry_points_are_read_once_and_factories_still_run_per_trainer(
    callback_plugin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []

    def counted(**kwargs: str) -> importlib.metadata.EntryPoints:
        reads.append(kwargs["group"])
        return importlib.metadata.entry_points(**kwargs)

    monkeypatch.setattr(registry, "entry_points", counted)  # restored after the test
    _read_entry_points_once()
    trainers = [L.Trainer(logger=False, enable_checkpointing=False) for _ in range(3)]

    assert reads == ["lightning.pytorch.callbacks_factory"]
    plugin = [_plugin_callbacks(t) for t in trainers]
    assert all(len(p) == 1 for p in plugin)
    assert len({id(p[0]) for p in plugin}) == 3  # a new callback for each Trainer
