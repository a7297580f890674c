import time
from pathlib import Path

import pytest
import yaml

from fl_lightning.config.load import load_config
from fl_lightning.config.yaml_input import apply_override, dump_yaml, parse_yaml
from fl_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 0.001),  # YAML 1.1: text
        ("2026-12-06", "2026-12-06"),  # YAML 1.1: a date
        ("-.inf", float("-inf")),
        ("True", True),
        ("~", None),
        ("'010'", "010"),  # quoted: text in every YAML
    ],
)
def test_plain_scalars_are_read_as_yaml_1_2_reads_them(text: str, value: object) -> None:
    assert parse_yaml(f"key: {text}", "a test")["key"] == value


@pytest.mark.parametrize(
    ("text", "yaml_1_1"),
    [
        ("010", "8"),  # octal in YAML 1.1, 10 in YAML 1.2
        ("0o17", "'0o17'"),
        ("1:30", "90"),  # base 60 in YAML 1.1, text in YAML 1.2
        ("1_000", "1000"),
        ("yes", "True"),
        ("off", "False"),
    ],
)
def test_a_value_yaml_1_1_and_1_2_read_differently_is_refused(text: str, yaml_1_1: str) -> None:
    with pytest.raises(ConfigError, match=rf"^override 'seed': '{text}' is read as {yaml_1_1} by"):
        load_config(REPO / "configs" / "mnist.yaml", [f"seed={text}"])
    assert load_config(REPO / "configs" / "mnist.yaml", [f"output.experiment='{text}'"])


def test_what_is_written_reads_back_the_same_in_either_yaml() -> None:
    for text in ("010", "0x2A", "1:30", "yes", "2026-12-06", "1e-3", "0o17"):
        written = dump_yaml({"key": text})
        assert parse_yaml(written, "a test")["key"] == text
        assert yaml.safe_load(written)["key"] == text


def test_a_number_too_long_to_read_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^override 'seed': a number of 5000 digits is too long"):
        load_config(REPO / "configs" / "mnist.yaml", ["seed=" + "1" * 5000])


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The review's 756-byte config: nine levels of nine-way aliases under model.init_args."""
    lines = ["model:", "  class_path: fl_lightning.models.MLP", "  init_args:"]
    lines.append(f"    a0: &a0 [{', '.join(['1'] * width)}]")
    for level in range(1, levels + 1):
        lines.append(f"    a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 1000  # 9**10 values once expanded
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"expands to more than 100000 values"):
        load_config(path)
    assert time.perf_counter() - started < 5  # refused while parsing, not after expanding
    with pytest.raises(ConfigError, match="an alias refers to a section that contains it"):
        parse_yaml("a: &x [1, *x]", "a loop")
    assert parse_yaml("a: &x [1, 2]\nb: [*x, *x]", "a few aliases") == {
        "a": [1, 2],
        "b": [[1, 2], [1, 2]],
    }
