"""`--resume`: a killed run's `checkpoints/resume.pt` (`server.resume_state`), checked.

Every client-side random draw (shuffles, dropout, augmentation, DP-SGD noise) and client
sampling is seeded by (seed, round, client), so a resumed run continues as the killed one
would have. The file holds tensors and plain data only (dicts, lists, tuples, strings,
numbers, None) and is read with `torch.load(weights_only=True)`, which builds nothing
else: a file that holds Python objects (a pickle payload) is refused without running any
of it. Every part is then checked against the run's config and model before anything is
used or changed, and each strategy attribute is rebuilt with the type its Flower class
keeps it in (`fl_lightning.server.strategy_state`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from fl_lightning.config.schema import Config
from fl_lightning.config.yaml_input import dump_yaml, parse_yaml
from fl_lightning.errors import ConfigError
from fl_lightning.files import NotAFile, open_regular, write_atomically
from fl_lightning.privacy.accountant_state import is_rdp_step
from fl_lightning.server.checks import is_metric_name
from fl_lightning.server.reply_screen import BATCHNORM, EVALUATE, TRAIN
from fl_lightning.server.resume_state import FORMAT, ResumeState, decode_rng, resume_path
from fl_lightning.server.round_metrics import SOURCES
from fl_lightning.server.rundir import RunDir, round_of
from fl_lightning.server.strategy import STRATEGY_CLASSES
from fl_lightning.server.strategy_state import (
    Malformed,
    by_name,
    decode_strategy_state,
    expect,
    is_partition,
    is_python_int,
    is_tensor,
)
from fl_lightning.vocabulary import MAX_METRIC_NAME

_KEYS = {"format", "round", "weights", "strategy", "history", "ledger", "rng"}
_KEYS |= {"logged", "screened"}
_SCREEN_KEYS = {"agreed", "votes"}
_LEDGER_KEYS = {"sampled", "trained", "releases"}


def load(cfg: Config, path: Path) -> tuple[RunDir, ResumeState]:
    """Check that `path` is a run of `cfg` that can continue, and load its state.

    Nothing in resume.pt is executed, and nothing in the run directory changes until all
    of it is checked. Then metrics.jsonl is cut back to the last completed round (a kill
    can leave a record of a round whose state was never saved, or half a record).
    """
    run = RunDir(path)
    _check_config(cfg, run, path)
    file = resume_path(run)
    if not file.exists():
        raise ConfigError(
            f"--resume: {path} has no completed round to continue from; start it again instead"
        )
    raw = _read(file)
    try:
        state = _parse(raw, cfg, _model_state(cfg))
    except Malformed as err:
        raise ConfigError(
            f"--resume: {file} is not resume state of this run ({err}); start a new run"
        ) from None
    if state.round >= cfg.federation.num_rounds:
        raise ConfigError(
            f"--resume: {path} already finished all {cfg.federation.num_rounds} rounds"
        )
    _cut_metrics(run, state.round)
    return run, state


def _check_config(cfg: Config, run: RunDir, path: Path) -> None:
    """Refuse a folder that holds no run, or a run of another config."""
    if not run.config.exists():
        raise ConfigError(f"--resume: {path} holds no run (no config.yaml); check the path")
    saved = _saved_config(run)
    ours = parse_yaml(dump_yaml(cfg.to_dict()), "the config")  # as config.yaml holds it
    for section in (saved, ours):
        section.pop("output", None)  # where a run writes is not part of what it computes
    if saved != ours:
        key = _first_difference(saved, ours)
        raise ConfigError(
            f"--resume: {path} was run with another config ({key} differs); "
            "resume it with the config and overrides it was started with"
        )


def _saved_config(run: RunDir) -> dict[Any, Any]:
    """The run's config.yaml as a mapping, read as strictly as a config file is."""
    try:
        with open_regular(run.config) as stream:
            text = stream.read().decode("utf-8")
    except NotAFile:
        text, problem = None, "not a plain file"
    except OSError as err:
        raise ConfigError(
            f"--resume: cannot read {run.config} ({err.strerror or err}); "
            "check it and its permissions"
        ) from None
    except UnicodeDecodeError:
        text, problem = None, "not UTF-8 text"
    if text is not None:
        try:
            saved = parse_yaml(text, "its YAML")
        except ConfigError as err:  # malformed, a key written twice, nested too deeply
            problem = " ".join(str(err).split())
        else:
            if isinstance(saved, dict):
                return saved
            problem = "empty" if saved is None else f"a YAML {type(saved).__name__}, no mapping"
    raise ConfigError(f"--resume: {run.config} is not a run's config ({problem}); start a new run")


def _read(file: Path) -> Any:
    """resume.pt's contents, built from tensors and plain data only."""
    try:
        with open_regular(file) as stream, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice on loading unsafely is not ours
            return torch.load(stream, map_location="cpu", weights_only=True)
    except NotAFile:
        raise ConfigError(
            f"--resume: {file} is not a plain file (a FIFO, a device or a folder), so not the "
            "resume state a run writes; start a new run"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"--resume: cannot read {file} ({err.strerror}); check it and its permissions"
        ) from None
    except Exception:  # whatever a damaged or crafted file raises: none of it was run
        raise ConfigError(
            f"--resume: {file} is not resume state this fl-lightning can read (damaged, "
            "from an older version, or holding Python objects, which are never loaded); "
            "start a new run"
        ) from None


def _parse(raw: Any, cfg: Config, model: dict[str, torch.Tensor]) -> ResumeState:
    """Check every part of resume.pt's contents against the run's config and model."""
    expect(isinstance(raw, dict) and set(raw) == _KEYS, "not the parts resume state has")
    expect(is_python_int(raw["format"]) and raw["format"] == FORMAT, "an unknown format")
    last = raw["round"]
    rounds = cfg.federation.num_rounds
    expect(
        is_python_int(last) and 0 <= last <= rounds, f"round is not a round number of 0..{rounds}"
    )
    weights = _check_weights(raw["weights"], model)
    state = ResumeState(
        raw["round"],
        weights,
        raw["strategy"],
        _check_history(raw["history"], raw["round"]),
        _check_ledger(raw["ledger"], cfg, raw["round"]),
        raw["rng"],
        _check_logged(raw["logged"]),
        _check_screened(raw["screened"], cfg),
    )
    decode_rng(raw["rng"])
    cls = STRATEGY_CLASSES[cfg.strategy.name]
    decode_strategy_state(cls, raw["strategy"], weights, cfg.federation.num_clients)
    return state


def _model_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The global model's arrays as this config builds them (names, shapes, dtypes)."""
    from fl_lightning.models.build import build_model

    with torch.random.fork_rng(devices=[]):  # building draws initial weights: not ours to take
        return build_model(cfg).state_dict()


def _check_weights(weights: Any, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global weights, if they are the model's arrays (names, shapes, dtypes), finite."""
    expect(by_name(weights) and set(weights) == set(model), "weights: not the model's")
    for key, reference in model.items():
        value = weights[key]
        expect(is_tensor(value), f"weights.{key}: not a tensor")
        expect(
            value.shape == reference.shape and value.dtype == reference.dtype,
            f"weights.{key}: {value.dtype} {tuple(value.shape)}, the model's "
            f"{reference.dtype} {tuple(reference.shape)}",
        )
        if value.is_floating_point():
            expect(bool(torch.isfinite(value).all()), f"weights.{key}: not finite")
    return {key: weights[key].detach() for key in model}


def _check_history(history: Any, last: int) -> dict[int, dict[str, float]]:
    """The round records behind summary.md: rounds up to `last` -> metric name -> number."""
    expect(isinstance(history, dict), "history: not a record per round")
    expect(
        last in history and all(is_python_int(r) and 0 <= r <= last for r in history),
        f"history: not the records of rounds up to {last}",
    )
    for metrics in history.values():
        expect(
            isinstance(metrics, dict)
            and all(_is_name(k) and _is_number(v) and math.isfinite(v) for k, v in metrics.items()),
            "history: not finite numbers under metric names",
        )
    return history


def _check_ledger(ledger: Any, cfg: Config, last: int) -> dict[str, Any] | None:
    """The privacy ledger's `state()`: present exactly when the run has a privacy mode.

    A client trained in at most the rounds it was sent training, and was sent at most one
    training message a round.
    """
    if cfg.privacy.mode == "none":
        expect(ledger is None, "ledger: a privacy ledger in a run without privacy")
        return None
    clients = cfg.federation.num_clients
    # Without it the epsilon would silently start again from 0.
    expect(isinstance(ledger, dict) and set(ledger) == _LEDGER_KEYS, "ledger: missing")
    sampled, trained = ledger["sampled"], ledger["trained"]
    for name, counts in (("sampled", sampled), ("trained", trained)):
        expect(
            isinstance(counts, list)
            and len(counts) == clients
            and all(is_python_int(n) and 0 <= n <= last for n in counts),
            f"ledger.{name}: not a count of rounds per client",
        )
    expect(
        all(t <= n for t, n in zip(trained, sampled, strict=True)),
        "ledger.trained: more rounds than the client was sent training",
    )
    releases = ledger["releases"]
    expect(
        isinstance(releases, list)
        and len(releases) <= last
        and all(_is_release(r) for r in releases),
        "ledger.releases: not an accountant's history of one release a round",
    )
    return ledger


def _check_logged(logged: Any) -> dict[str, list[str]]:
    """The metric names each source has logged: source -> names."""
    expect(
        isinstance(logged, dict) and set(logged) <= set(SOURCES),
        "logged: not metric names per source",
    )
    expect(all(_is_names(names) for names in logged.values()), "logged: not metric names")
    return logged


def _check_screened(screened: Any, cfg: Config) -> dict[str, Any] | None:
    """The reply screen's `state()`: agreed names per stage, each partition's vote per stage."""
    if screened is None:
        return None
    stages = {TRAIN, EVALUATE, BATCHNORM}
    expect(isinstance(screened, dict) and set(screened) == _SCREEN_KEYS, "screened: missing")
    agreed, votes = screened["agreed"], screened["votes"]
    expect(
        isinstance(agreed, dict)
        and set(agreed) <= stages
        and all(_is_names(names) for names in agreed.values()),
        "screened.agreed: not metric names per stage",
    )
    clients = cfg.federation.num_clients
    expect(
        isinstance(votes, dict)
        and set(votes) <= stages
        and all(
            isinstance(by_partition, dict)
            and all(is_partition(p, clients) and _is_names(n) for p, n in by_partition.items())
            for by_partition in votes.values()
        ),
        "screened.votes: not metric names per stage and partition",
    )
    for stage, names in agreed.items():
        # The screen agrees on the names more than half of the partitions sent.
        held = [n for n in votes.get(stage, {}).values() if set(n) == set(names)]
        expect(
            2 * len(held) > len(votes.get(stage, {})),
            f"screened.agreed: the {stage} names are not what most clients sent",
        )
    return screened


def _is_names(names: Any) -> bool:
    """A list of distinct metric names."""
    return isinstance(names, list) and all(map(_is_name, names)) and len(set(names)) == len(names)


def _is_name(name: Any) -> bool:
    """A metric name as a reply may carry it, or as the run logs it (a source's prefix)."""
    return is_metric_name(name, longest=MAX_METRIC_NAME + 32)


def _is_release(entry: Any) -> bool:
    """An RDP accountant's history entry, as the ledger keeps it: a tuple."""
    return isinstance(entry, tuple) and is_rdp_step(entry)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cut_metrics(run: RunDir, last_round: int) -> None:
    """Keep metrics.jsonl's records up to `last_round`; drop later ones and torn lines."""
    if not run.metrics.exists():
        return
    try:
        old = run.read_metrics()
    except OSError as err:
        raise ConfigError(
            f"--resume: cannot read {run.metrics} ({err.strerror or err}); it must be the "
            "file the run wrote: start a new run"
        ) from None
    rounds = [(line, round_of(line)) for line in old.splitlines()]
    new = b"".join(line + b"\n" for line, r in rounds if r is not None and r <= last_round)
    if new != old:

        def write(partial: Path) -> None:
            partial.write_bytes(new)

        write_atomically(run.metrics, write)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):  # a damaged file may have int keys
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "the config"
