from pathlib import Path

import pytest

from fl_lightning.config import load_config
from fl_lightning.errors import ConfigError
from fl_lightning.yaml_input import apply_override


def test_apply_override_creates_missing_sections() -> None:
    raw: dict = {}
    apply_override(raw, "federation.client_resources.num_cpus=2")
    assert raw == {"federation": {"client_resources": {"num_cpus": 2}}}


def test_an_override_fills_a_section_written_empty(tmp_path: Path) -> None:
    # `data:` with nothing under it loads as None, which config_from_dict reads as an empty
    # section; an override into it must too, not call it "a value, not a section".
    raw: dict = {"data": None}
    apply_override(raw, "data.root=x")
    assert raw == {"data": {"root": "x"}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("data:\nfederation:\n  num_rounds: 1\n")
    cfg = load_config(empty, ["data.root=x", "data.noise.std=0.5"])
    assert (Path(cfg.data.root).name, cfg.data.noise.std) == ("x", 0.5)
    assert cfg.data.batch_size == 32  # the rest of the section keeps its defaults
    with pytest.raises(ConfigError, match="seed: is a value, not a section"):
        apply_override({"seed": 1}, "seed.x=2")
