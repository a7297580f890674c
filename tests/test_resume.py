"""resume.pt: tensors and plain data only, every part checked, nothing in it ever run."""

from __future__ import annotations

import os
import pickle
import random
import signal
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt

from fl_lightning.cli import main
from fl_lightning.config.load import load_config
from fl_lightning.config.schema import Config, StrategyConfig
from fl_lightning.data.datasets import load_splits
from fl_lightning.errors import ConfigError
from fl_lightning.models.build import build_model
from fl_lightning.server import resume, resume_state
from fl_lightning.server.rundir import RunDir, create_run_dir
from fl_lightning.server.strategy_state import load_strategy_state, strategy_state
from tests.conftest import REPO

STRATEGIES = typing.get_args(typing.get_type_hints(StrategyConfig)["name"])


class Payload:
    """What an attacker pickles: unpickling it runs a shell command that leaves a marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def config(overrides: list[str], *extra: str) -> Config:
    """configs/mnist.yaml shrunk, with 3 rounds (a state after round 1 can continue)."""
    return load_config(
        REPO / "configs" / "mnist.yaml", [*overrides, "federation.num_rounds=3", *extra]
    )


def model_weights(cfg: Config) -> dict[str, torch.Tensor]:
    return build_model(cfg, load_splits(cfg.data).num_classes).state_dict()


def fill(strategy: object, weights: dict[str, torch.Tensor]) -> None:
    """Give a strategy the state a round leaves, in the types its Flower class uses."""
    arrays = {k: v.numpy().copy() for k, v in weights.items()}
    if isinstance(strategy, FedOpt):
        # Flower's moment updates turn 0-d entries into NumPy scalars.
        strategy.m_t = {k: (a * 0.5)[()] if a.ndim == 0 else a * 0.5 for k, a in arrays.items()}
        strategy.v_t = {k: np.square(a).astype(np.float64) for k, a in arrays.items()}
    if isinstance(strategy, FedAvgM):
        strategy.current_arrays = ArrayRecord(
            {k: Array(np.asarray(a + 1)) for k, a in arrays.items()}
        )
        strategy.momentum_vector = [(a - 1)[()] if a.ndim == 0 else a - 1 for a in arrays.values()]
    strategy.accountants = {0: ACCOUNTANT}  # type: ignore[attr-defined]


# What a DP-SGD client's Opacus RDPAccountant.state_dict() is as JSON, after 3 steps.
ACCOUNTANT = '{"history": [[1.1, 0.01, 3]], "mechanism": "rdp"}'


def assert_same_state(restored: object, original: object) -> None:
    """Each kept attribute is back with the same type, keys, order, dtypes and values."""
    for name in ("m_t", "v_t", "current_arrays", "momentum_vector", "accountants"):
        a: Any = getattr(restored, name, None)
        b: Any = getattr(original, name, None)
        assert type(a) is type(b), name
        if isinstance(b, ArrayRecord):
            a, b = (
                dict(zip(a.keys(), a.to_numpy_ndarrays(), strict=True)),
                dict(zip(b.keys(), b.to_numpy_ndarrays(), strict=True)),
            )
        if isinstance(b, dict) and name != "accountants":
            assert list(a) == list(b), name
            a, b = list(a.values()), list(b.values())
        if isinstance(b, list):
            assert len(a) == len(b), name
            for x, y in zip(a, b, strict=True):
                assert type(x) is type(y) and x.dtype == y.dtype, name
                np.testing.assert_array_equal(x, y)
        else:
            assert a == b, name


def build(cfg: Config) -> Any:
    """The run's strategy, as the ServerApp builds it (the recorder is not used here)."""
    from fl_lightning.server.strategy import build_strategy

    try:
        from fl_lightning.server.census import Census

        return build_strategy(cfg, None, Census(cfg.federation.num_clients))  # type: ignore[arg-type]
    except ImportError:  # a tree without the census
        return build_strategy(cfg, None)  # type: ignore[arg-type,call-arg]


def write_state(run: RunDir, cfg: Config, strategy: Any, weights: dict[str, torch.Tensor]) -> None:
    ledger = None
    if cfg.privacy.mode != "none":  # the ledger's own state after a round
        from fl_lightning.privacy.ledger import PrivacyLedger

        kept = PrivacyLedger(cfg, [150] * cfg.federation.num_clients)
        kept.record_release()
        ledger = kept.state()
    resume_state.save(
        run,
        resume_state.ResumeState(
            1,
            weights,
            strategy.state_dict(),
            {0: {"test/accuracy": 0.1}, 1: {"test/accuracy": 0.5, "failures": 0}},
            ledger,
            resume_state.capture_rng(),
        ),
    )


@pytest.fixture()
def saved(tiny_overrides: list[str]) -> tuple[Config, RunDir]:
    """A run after round 1 of 3 (FedAvgM): config.yaml, metrics.jsonl and resume.pt."""
    cfg = config(tiny_overrides, "strategy.name=fedavgm")
    run = create_run_dir(cfg)
    run.metrics.write_text('{"round": 0}\n{"round": 1}\n')
    strategy = build(cfg)
    weights = model_weights(cfg)
    fill(strategy, weights)
    write_state(run, cfg, strategy, weights)
    return cfg, run


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_state_survives_the_file(name: str, tiny_overrides: list[str]) -> None:
    clients = 3 if name == "krum" else 2  # Krum needs more than 2 clients
    cfg = config(tiny_overrides, f"strategy.name={name}", f"federation.num_clients={clients}")
    run = create_run_dir(cfg)
    original, weights = build(cfg), model_weights(cfg)
    fill(original, weights)
    write_state(run, cfg, original, weights)
    _, state = resume.load(cfg, run.path)
    restored = build(cfg)
    restored.load_state_dict(state.strategy, state.weights)
    assert_same_state(restored, original)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad, FedAvgM])
def test_zero_dim_and_integer_arrays_keep_their_types(
    cls: type, tiny_mnist: Config, tmp_path: Path
) -> None:
    # A BatchNorm model: a 0-d int64 counter beside float32 arrays.
    weights = {
        "w": torch.randn(3, 2),
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.running_mean": torch.randn(2, dtype=torch.float64),
    }
    original = cls()
    fill(original, weights)
    path = tmp_path / "state.pt"
    torch.save(strategy_state(original), path)
    kept = torch.load(path, weights_only=True)
    restored = cls()
    load_strategy_state(restored, kept, weights, tiny_mnist.federation.num_clients)
    assert_same_state(restored, original)


def test_rng_states_survive_the_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # NumPy now holds a cached Gaussian too
    torch.save(resume_state.capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    resume_state.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (
        random.random(),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
    ) == expected


def crafted_zip(path: Path, marker: Path) -> None:
    torch.save({"round": 1, "strategy": {"m_t": Payload(marker)}}, path)


def crafted_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"round": 1, "weights": Payload(marker)}))


def truncated(path: Path, marker: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def garbage(path: Path, marker: Path) -> None:
    path.write_bytes(b"\x80\x02not a checkpoint")


def a_fifo(path: Path, marker: Path) -> None:
    # A plain open() of a FIFO waits for a writer forever: the review's --resume hang.
    path.unlink()
    os.mkfifo(path)


@pytest.fixture()
def no_hang() -> Iterator[None]:
    """Fail, rather than hang, a test whose code under test blocks for more than 60 s."""

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("damage", [crafted_zip, crafted_pickle, truncated, garbage, a_fifo])
@pytest.mark.usefixtures("no_hang")
def test_a_crafted_or_damaged_file_is_refused_in_one_line_and_never_run(
    damage: Any,
    saved: tuple[Config, RunDir],
    tiny_overrides: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, run = saved
    marker = tmp_path / "payload-ran"
    damage(resume_state.resume_path(run), marker)
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    capsys.readouterr()
    args = [
        "run",
        str(REPO / "configs" / "mnist.yaml"),
        *tiny_overrides,
        "federation.num_rounds=3",
        "strategy.name=fedavgm",
    ]
    assert main([*args, "--resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()  # the payload never ran
    assert err.startswith("error: --resume: ") and err.count("\n") == 1, err
    assert "start a new run" in err
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before


def mutate(raw: Any, path: str, value: Any) -> None:
    """Replace (or delete) the part of resume.pt's contents at `path` (a/b/0)."""
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split("/")]
    for key in keys[:-1]:
        raw = raw[key]
    if value is DELETE:
        del raw[keys[-1]]
    else:
        raw[keys[-1]] = value


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("format", 1),
        ("format", DELETE),
        ("extra", 1),
        ("round", -1),
        ("round", "1"),
        ("round", torch.tensor([1, 2])),
        ("weights/net.0.weight", torch.zeros(2)),
        ("weights/net.0.weight", DELETE),
        ("weights/net.11.bias", torch.full((10,), float("nan"))),
        ("weights/net.11.bias", torch.zeros(10, dtype=torch.float64)),
        ("weights/net.11.bias", torch.zeros(10).to_sparse()),
        ("weights/net.11.bias", [0.0] * 10),
        ("strategy/m_t", {}),  # FedAvgM keeps no moments
        ("strategy/momentum_vector", []),
        ("strategy/momentum_vector/0", torch.zeros(1)),
        ("strategy/current_arrays/net.11.bias", torch.zeros(10, dtype=torch.complex64)),
        ("strategy/accountants", {5: "{}"}),
        ("strategy/accountants", {0: "not json"}),
        ("strategy/accountants", {0: "{}"}),  # JSON, but no accountant a client could load
        ("strategy/accountants", {0: ACCOUNTANT.replace("3]", "0]")}),  # 0 steps
        ("strategy/accountants", {0: ACCOUNTANT.replace("rdp", "gdp")}),
        ("strategy/accountants", {torch.tensor([1, 2]): "{}"}),
        ("history", {0: {"test/accuracy": "high"}}),
        ("history", [1, 2]),
        ("history/1", {"test/accuracy": float("nan")}),
        ("history/1", {"test/accuracy": float("inf")}),
        ("history/99", {"test/accuracy": 1.0}),  # a forged round the run never reached
        ("history/1", {"\x1b[31m": 1.0}),
        ("ledger", {"sampled": [0, 0]}),  # a ledger in a run without privacy
        ("rng/python", (3, (1, 2), None)),
        ("rng/python", torch.tensor([3, 3])),
        ("rng/numpy/key", torch.zeros(624, dtype=torch.float32)),
        ("rng/numpy/pos", 10_000),
        ("rng/torch", torch.zeros(3, dtype=torch.uint8)),
        ("logged", DELETE),
        ("logged", {"elsewhere": ["loss"]}),
        ("logged", {"train": "loss"}),
        ("logged", {"train": ["loss", "loss"]}),
        ("screened", {"agreed": {}}),
        ("screened", {"agreed": {"train": [1]}, "votes": {}}),
        ("screened", {"agreed": {}, "votes": {"train": {5: ["loss"]}}}),  # 2 clients
        # Names no client sent: every later reply would be rejected, every round skipped.
        ("screened", {"agreed": {"train": ["made/up"]}, "votes": {"train": {0: ["loss"]}}}),
        ("strategy/momentum_vector/0", torch.full((32, 1, 5, 5), float("nan"))),
        ("strategy/current_arrays/net.11.bias", torch.full((10,), float("inf"))),
    ],
)
def test_a_file_of_the_wrong_structure_is_refused_and_nothing_is_changed(
    path: str, value: Any, saved: tuple[Config, RunDir]
) -> None:
    cfg, run = saved
    file = resume_state.resume_path(run)
    raw = torch.load(file, weights_only=True)
    mutate(raw, path, value)
    torch.save(raw, file)
    run.metrics.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')  # a round to cut
    with pytest.raises(ConfigError, match=r"^--resume: .*; start a new run$"):
        resume.load(cfg, run.path)
    assert run.metrics.read_text() == '{"round": 0}\n{"round": 1}\n{"round": 2}\n'


def test_a_run_with_privacy_needs_its_ledger(tiny_overrides: list[str]) -> None:
    cfg = config(tiny_overrides, "privacy.mode=client_dp", "privacy.noise_multiplier=0.3")
    run = create_run_dir(cfg)
    strategy, weights = build(cfg), model_weights(cfg)
    write_state(run, cfg, strategy, weights)
    resume.load(cfg, run.path)  # with its ledger
    raw = torch.load(resume_state.resume_path(run), weights_only=True)
    raw["ledger"] = None  # without it, epsilon would silently start again from 0
    torch.save(raw, resume_state.resume_path(run))
    with pytest.raises(ConfigError, match="ledger"):
        resume.load(cfg, run.path)


def test_metrics_are_cut_to_the_saved_round_and_a_torn_line_is_dropped(
    saved: tuple[Config, RunDir],
) -> None:
    cfg, run = saved
    run.metrics.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"round": 3, "centr')
    resume.load(cfg, run.path)
    assert run.metrics.read_text() == '{"round": 0}\n{"round": 1}\n'
    run.metrics.write_text('{"round": 0}\n{"round": 1}\n{"round"')  # killed mid-write
    resume.load(cfg, run.path)
    assert run.metrics.read_text() == '{"round": 0}\n{"round": 1}\n'


def empty(path: Path) -> None:
    path.write_text("")


def a_list(path: Path) -> None:
    path.write_text("- 1\n- 2\n")


def malformed(path: Path) -> None:
    path.write_text("a: [\n")


def not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe")


def twice(path: Path) -> None:
    path.write_text(path.read_text() + "seed: 1\n")  # a key written twice


def a_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def unreadable(path: Path) -> None:
    pass  # its mode is taken away below, once the folder's files are read


def fifo(path: Path) -> None:
    a_fifo(path, path)


@pytest.mark.parametrize(
    "damage", [empty, a_list, malformed, not_utf8, twice, a_folder, unreadable, fifo]
)
@pytest.mark.usefixtures("no_hang")
def test_a_damaged_config_yaml_is_refused_in_one_line(
    damage: Any,
    saved: tuple[Config, RunDir],
    tiny_overrides: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    if damage is unreadable and os.geteuid() == 0:
        pytest.skip("root reads any file")
    _, run = saved
    damage(run.config)
    run.metrics.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')  # a round to cut
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    capsys.readouterr()
    args = ["run", str(REPO / "configs" / "mnist.yaml"), *tiny_overrides, "federation.num_rounds=3"]
    if damage is unreadable:
        run.config.chmod(0)
    try:
        assert main([*args, "strategy.name=fedavgm", "--resume", str(run.path)]) == 2
    finally:
        run.config.chmod(0o644)
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: ") and err.count("\n") == 1, err
    assert str(run.config) in err
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("name", "value"), [("m_t", np.nan), ("v_t", np.inf), ("v_t", -1.0)])
def test_a_fedadam_moment_that_would_freeze_the_run_is_refused(
    name: str, value: float, tiny_overrides: list[str]
) -> None:
    # A NaN second moment makes every later FedAdam step NaN (skipped); a negative one has
    # no square root. Neither can come from a run: both are refused in one line.
    cfg = config(tiny_overrides, "strategy.name=fedadam")
    run = create_run_dir(cfg)
    strategy, weights = build(cfg), model_weights(cfg)
    fill(strategy, weights)
    getattr(strategy, name)["net.11.bias"] = np.full(10, value)
    write_state(run, cfg, strategy, weights)
    with pytest.raises(
        ConfigError, match=rf"strategy\.{name}\.net\.11\.bias: (not finite|negative)"
    ):
        resume.load(cfg, run.path)


@pytest.mark.parametrize(
    ("part", "value"),
    [
        ("trained", [2, 0]),
        ("sampled", [5, 0]),
        ("sampled", [-1, 0]),
        ("releases", [(1.0, 1.0, 1)] * 3),
    ],
)
def test_a_ledger_that_no_run_could_keep_is_refused(
    part: str, value: Any, tiny_overrides: list[str]
) -> None:
    # After round 1: at most 1 round sent, trained no more than sent, one release a round.
    cfg = config(tiny_overrides, "privacy.mode=client_dp", "privacy.noise_multiplier=0.3")
    run = create_run_dir(cfg)
    write_state(run, cfg, build(cfg), model_weights(cfg))
    resume.load(cfg, run.path)
    raw = torch.load(resume_state.resume_path(run), weights_only=True)
    raw["ledger"][part] = value
    torch.save(raw, resume_state.resume_path(run))
    with pytest.raises(ConfigError, match=f"ledger.{part}"):
        resume.load(cfg, run.path)
