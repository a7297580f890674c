"""Fuzzing the config loader: whatever a user writes, only a one-line FlLightningError escapes."""

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_lightning.config.load import config_from_dict, load_config
from fl_lightning.config.schema import Config
from fl_lightning.config.yaml_input import apply_override
from fl_lightning.errors import FlLightningError

REPO = Path(__file__).resolve().parents[1]
MNIST_TEXT = (REPO / "configs" / "mnist.yaml").read_text()
FUZZ = settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# The C emitter where PyYAML has it: the pure-Python one would take most of the time.
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the config, sections included, as `a.b.c`."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(dotted_keys(hints[f.name], f"{prefix}{f.name}."))
    return keys


KEYS = dotted_keys(Config)
NAMES = sorted({key.rsplit(".", 1)[-1] for key in KEYS})
TRICKY_TEXT = [
    "~nosuchuser/x",
    "~",
    "",
    "auto",
    "ddp",
    "ddp_spawn",
    "fsdp",
    "bogus",
    "0,1",
    "-1",
    "0",
    "16-mixed",
    "bf16",
    "nan",
    "inf",
    "1e999",
    "/dev/null",
    "a\0b",
    "null",
    "fedadam",
    "krum",
    "dp_sgd",
    "client_dp",
    "imagefolder",
    "cifar10_net",
]
# Keys whose values reach pathlib, Lightning or Flower: drawn more often than the rest.
HOT_KEYS = [
    key
    for key in KEYS
    if key in ("data.root", "data.cache_dir", "seed") or key.startswith(("trainer.", "strategy."))
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, -1, 2, 3, 2**31, 2**32, 2**63, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 0.5, 1.0, 1e-300, 1e300]),
    st.sampled_from(TRICKY_TEXT),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8), st.integers(-3, 3))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=4,
)
# A config shaped like the real one (real sections, mostly real keys) with random values.
sections = st.dictionaries(
    st.sampled_from([k for k in KEYS if "." not in k]) | st.text(max_size=6),
    st.dictionaries(keys, values, max_size=4) | values,
    max_size=4,
)
overrides = st.builds(
    lambda key, value, text: f"{key}={text if value is None else value}",
    st.sampled_from(HOT_KEYS) | st.sampled_from(KEYS) | st.text(max_size=10),
    st.none() | scalars.map(lambda v: yaml.dump(v, Dumper=DUMPER, default_flow_style=True).strip()),
    st.text(max_size=20) | st.sampled_from(TRICKY_TEXT),
)


def only_our_errors(action: typing.Callable[[], Any]) -> None:
    """Run `action`; a FlLightningError must be one line, and nothing else may escape."""
    try:
        action()
    except FlLightningError as err:
        assert "\n" not in str(err), str(err)


@FUZZ
@given(raw=sections)
def test_config_from_dict_raises_only_config_errors(raw: dict[Any, Any]) -> None:
    only_our_errors(lambda: config_from_dict(raw))


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file the YAML cases are written to in turn (a folder per case would be slow)."""
    return tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"


@FUZZ
@given(raw=sections, plain=st.text(max_size=60), as_text=st.booleans())
def test_load_config_raises_only_config_errors(
    fuzz_file: Path, raw: dict[Any, Any], plain: str, as_text: bool
) -> None:
    text = plain if as_text else yaml.dump(raw, Dumper=DUMPER)
    fuzz_file.write_text(text, encoding="utf-8", errors="surrogatepass")
    only_our_errors(lambda: load_config(fuzz_file))


@FUZZ
@given(items=st.lists(overrides, min_size=1, max_size=4))
def test_overrides_raise_only_config_errors(items: list[str]) -> None:
    def apply() -> None:
        raw = yaml.safe_load(MNIST_TEXT)
        raw["data"]["root"] = "/nonexistent"
        for item in items:
            apply_override(raw, item)
        config_from_dict(raw)

    only_our_errors(apply)
