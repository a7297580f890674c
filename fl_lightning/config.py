"""Typed run configuration: the dataclasses, built from YAML + overrides and validated once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fl_lightning.class_path import ClassSpec
from fl_lightning.errors import ConfigError
from fl_lightning.trainer_flags import device_count, validate_trainer
from fl_lightning.yaml_input import _key_text, _show, apply_override, parse_yaml

DatasetName = Literal["mnist", "cifar10", "imagefolder"]
# A Flower node id: an unsigned 64-bit integer (config integers are otherwise int64).
NodeId = Annotated[int, "uint64"]
ModelName = Literal["mnist_net", "cifar10_net", "mlp"]

# Input shape each dataset produces; imagefolder's comes from data.channels/image_size.
DATASET_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
# State-dict keys (by suffix) of the BatchNorm statistics that recompute measures anew.
BATCHNORM_STATISTICS = (".running_mean", ".running_var")


@dataclass(frozen=True)
class NoiseConfig:
    """Clients whose data is corrupted (the clean-vs-noisy clients experiment)."""

    clients: tuple[int, ...] = ()  # partition ids of the noisy clients
    std: float = 0.0  # Gaussian noise added to pixels in [0, 1], then clipped
    label_fraction: float = 0.0  # share of a noisy client's labels replaced at random


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, how it is split across clients."""

    dataset: DatasetName = "mnist"
    root: str = "data"
    download: bool = False
    val_fraction: float = 0.1
    # How the training data is split into clients. "site": it is not; each client's data
    # is its own (a deployed SuperNode names its folder: node config `data-root`).
    partition: Literal["iid", "dirichlet", "shards", "site"] = "iid"
    alpha: float = 0.5  # dirichlet: concentration (smaller = more skewed label mixes)
    shards_per_client: int = 2  # shards: label-sorted shards each client holds
    batch_size: int = 32
    # Evaluation only (clients' validation, the server's test split): larger batches than
    # training save per-batch overhead, but on a CPU much larger ones run slower, their
    # activations spilling out of the caches (the CIFAR-10 test split through CIFAR10Net,
    # 2 threads: 9.8 s at 64, 12.5 s at 256). Raise it on a GPU.
    eval_batch_size: int = 64
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    # imagefolder only: images are converted to this many channels and resized square.
    channels: Literal[1, 3] = 3
    image_size: int | None = None
    # Training batches: random crop of the zero-padded image (pad = size / 8), plus a
    # horizontal flip for `crop_flip` (natural images, not digits).
    augment: Literal["none", "crop", "crop_flip"] = "none"
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    # Where decoded image tensors are cached (JPEG trees decode once, not once per process).
    cache_dir: str = "~/.cache/fl-lightning"
    # Any LightningDataModule instead of a built-in dataset (see fl_lightning.client_data
    # for the federated contract); the keys above marked built-in do not apply to it.
    class_path: str | None = None
    init_args: dict[str, Any] = field(
        default_factory=dict, hash=False
    )  # unhashed: a dict has no hash


# data.* keys that configure the built-in datasets only; a data.class_path DataModule is
# configured by its own init_args instead. The others (partition, alpha, shards_per_client,
# val_fraction) also cut a plain DataModule's training set into clients.
BUILTIN_DATA_KEYS = (
    "dataset", "root", "download", "batch_size", "eval_batch_size", "max_train_samples",
    "max_test_samples", "channels", "image_size", "augment", "noise", "cache_dir",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Which LightningModule is trained: a built-in by `name`, or any by `class_path`."""

    # A built-in model (null when class_path names the module).
    name: ModelName | None = "mnist_net"
    label_smoothing: float = 0.0  # built-in models: of the training loss
    # Built-in models' hidden activation: tanh bounds activations, which suits DP-SGD's
    # clipped gradients (Papernot et al., 2021, "tempered sigmoid").
    activation: Literal["relu", "tanh"] = "relu"
    # Any LightningModule, as Lightning's CLI names it, built with `init_args`.
    class_path: str | None = None
    init_args: dict[str, Any] = field(
        default_factory=dict, hash=False
    )  # unhashed: a dict has no hash


# model.* keys of the built-in models only (besides `name`).
BUILTIN_MODEL_KEYS = ("label_smoothing", "activation")
# optimizer.* keys that configure the built-in models' optimizer; a model.class_path module
# configures its own (configure_optimizers). The round schedule (warmup_rounds,
# round_decay) and ema_decay apply to every module.
BUILTIN_OPTIMIZER_KEYS = ("name", "lr", "weight_decay", "momentum", "scheduler")


@dataclass(frozen=True)
class OptimizerConfig:
    """Client optimizer, built in the LightningModule's configure_optimizers."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    # Within a round: cosine decay of the lr over the client's local steps (or none).
    scheduler: Literal["none", "cosine"] = "none"
    # Across rounds (the server sends each round its lr): linear warmup over the first
    # `warmup_rounds` rounds (round r < warmup_rounds trains with lr * r / warmup_rounds),
    # then lr * round_decay ** (r - 1). A low first-round lr keeps clients that start
    # from a random model from drifting apart before the first average.
    warmup_rounds: int = 0
    round_decay: float = 1.0
    # A client sends the exponential moving average of its weights over its local steps
    # (Lightning's EMAWeightAveraging, this decay per step) instead of its last iterate;
    # null: the last iterate.
    ema_decay: float | None = None


@dataclass(frozen=True)
class TrainerConfig:
    """Keyword arguments for each client's `lightning.Trainer` (max_epochs = local epochs)."""

    accelerator: str = "cpu"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    precision: str | int = "32-true"
    max_epochs: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    accumulate_grad_batches: int = 1
    limit_train_batches: int | float | None = None
    deterministic: bool = False
    enable_progress_bar: bool = False
    enable_model_summary: bool = False
    # Lightning callbacks for each client's Trainer, by class_path and init_args.
    callbacks: tuple[ClassSpec, ...] = ()
    # Every other `lightning.Trainer` keyword, as written under `trainer:` (checked against
    # Trainer's signature at load).
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def kwargs(self) -> dict[str, Any]:
        """The Trainer keywords (callbacks excluded: they are built per Trainer)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del flat["callbacks"], flat["extra"]
        if flat["limit_train_batches"] is None:
            del flat["limit_train_batches"]
        return {**flat, **self.extra}


@dataclass(frozen=True)
class ClientResourcesConfig:
    """Resources the Simulation Engine reserves for each client (fractions allowed)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class FederationConfig:
    """How many clients, how many rounds, who takes part in each."""

    num_clients: int = 5
    num_rounds: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_timeout: float = 3600.0
    # A round aggregates only if at least this many sampled clients sent a usable update;
    # otherwise it is skipped (the global model stays) with a warning.
    min_train_clients: int = 1
    client_resources: ClientResourcesConfig = field(default_factory=ClientResourcesConfig)
    # A running Ray cluster (`ray start --head`; "auto" finds a local head) to spread the
    # simulated clients over; None starts Ray on this machine alone.
    ray_address: str | None = None
    # A deployment with SuperNode authentication: node_ids[p] is the node id the SuperLink
    # gave the public key of partition p's site (`flwr supernode register`); the census
    # then accepts partition p from that node only. `deploy-local` sets it.
    node_ids: tuple[NodeId, ...] | None = None


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation strategy."""

    name: Literal[
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedavgm",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
    ] = "fedavg"
    proximal_mu: float = 0.01  # fedprox
    eta: float = 1e-2  # fedadam, fedyogi, fedadagrad: server learning rate
    beta_1: float = 0.9  # fedadam, fedyogi
    beta_2: float = 0.99  # fedadam, fedyogi
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    beta: float = 0.2  # fedtrimmedavg: share of updates cut at each end
    num_malicious_clients: int = 0  # krum
    # BatchNorm statistics of the aggregated model. "average": the mean of the clients'
    # running statistics (what FedAvg does to every array), which describe the clients'
    # models, not their average. "recompute": after each aggregation the round's clients
    # run the new global model over `batchnorm_batches` of their training batches
    # (torch's update_bn) and the server averages the statistics they measured.
    batchnorm: Literal["average", "recompute"] = "average"
    batchnorm_batches: int = 100
    # The update screen (fl_lightning.update_screen): a reply whose update (its weights
    # minus the global model's, L2 norm over every floating-point array) is more than
    # update_norm_factor times the median of the round's updates is rejected (null: off);
    # so is one over max_update_norm, for users who know their updates' scale. 100: far
    # above what honest clients of unequal sizes differ by, far below a poisoned update.
    update_norm_factor: float | None = 100.0
    max_update_norm: float | None = None


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: per-sample (DP-SGD, Opacus) or per-client (DP-FedAvg, Flower)."""

    mode: Literal["none", "dp_sgd", "client_dp"] = "none"
    # Gaussian noise std / clipping norm. dp_sgd and client_dp: set this or target_epsilon.
    noise_multiplier: float | None = None
    # Calibrate noise_multiplier so that a client taking part in every round ends the run
    # at this epsilon (at `delta`).
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # dp_sgd: per-sample gradient clipping norm
    # A round that would push a client's cumulative epsilon past this is not started.
    max_epsilon: float | None = None
    clipping: Literal["server", "client"] = "server"  # client_dp: who clips the updates
    clipping_norm: float = 1.0  # client_dp: L2 bound on each client's model update
    # Opacus's accountant for epsilon (and for calibrating noise_multiplier to
    # target_epsilon): "rdp" (Renyi DP), or "prv" (privacy random variables, Gopi et al.
    # 2021: a tighter valid bound, so less noise for the same epsilon; Opacus's own default).
    accountant: Literal["rdp", "prv"] = "rdp"
    # false (the default): DP noise and Poisson sampling draw from a cryptographically
    # secure source, so nobody who knows `seed` can recompute them. true: they are seeded
    # from `seed` (same seed, same run, for research), and the stated epsilon does not hold
    # against anyone who knows the seed, the server included.
    reproducible_noise: bool = False


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+: the server learns only the sum of the sampled clients' updates."""

    enabled: bool = False
    num_shares: int = 3  # clients each secret share goes to (including the owner), >= 3
    # Shares needed to unmask a client (< num_shares): up to num_shares - threshold of a
    # client's share holders may drop out, and fewer than threshold colluders learn nothing.
    reconstruction_threshold: int = 2
    # Each update coordinate (a delta from the global model, times its weight share) is
    # clipped to +-clipping_range, then quantized into quantization_range levels.
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    # Largest client weight (its number of examples); null: the largest partition's size.
    max_weight: float | None = None


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes: `dir` exactly, else `<root>/<experiment>/<timestamp>/`."""

    dir: str | None = None
    root: str = "runs"
    experiment: str | None = None  # default: the config file's stem
    # Per client: a model trained on its data alone ("before FL") against the global model
    # ("after FL"), each on the client's kind of test data; written to clients.json.
    client_report: bool = False
    # Each client's own Lightning logging (`self.log` in training) as a TensorBoard run of
    # its own, `<output.dir>/tensorboard/clients/<partition>`, written where the client runs.
    client_logs: bool = False


@dataclass(frozen=True)
class Config:
    """A whole run, as resolved from YAML and overrides."""

    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as written to the run's config.yaml (and loaded back)."""
        tree = dataclasses.asdict(self)
        trainer = tree["trainer"]
        trainer.update(trainer.pop("extra"))  # written flat under trainer:, as users write it
        trainer["callbacks"] = list(trainer["callbacks"])
        # A class_path module or DataModule has no built-in keys: written, they would be
        # refused when the config is loaded back (by a SuperNode, or to run it again).
        if self.model.class_path is not None:
            for key in ("name", *BUILTIN_MODEL_KEYS):
                del tree["model"][key]
            for key in BUILTIN_OPTIMIZER_KEYS:
                del tree["optimizer"][key]
        if self.data.class_path is not None:
            for key in BUILTIN_DATA_KEYS:
                del tree["data"][key]
        return tree


def input_shape(data: DataConfig) -> tuple[int, int, int]:
    """(channels, height, width) of the images the configured dataset yields."""
    if data.dataset == "imagefolder":
        assert data.image_size is not None  # enforced by validation
        return (data.channels, data.image_size, data.image_size)
    return DATASET_INPUT_SHAPES[data.dataset]


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file, apply `a.b=value` overrides, and return the validated Config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass the path of a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: pass a YAML file") from None
    except (OSError, ValueError) as err:  # a folder, no permission, a NUL in the path
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(
            f"config file {path} cannot be read ({reason}): pass a YAML file"
        ) from None
    # A project keeps its config beside its package (`fl-lightning init`): the classes it
    # names import from the config's folder too, wherever the command is started.
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    raw = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {_show(raw)}")
    for item in overrides:
        apply_override(raw, item)
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict) and raw["output"].get("experiment") is None:
        raw["output"]["experiment"] = path.stem
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (unknown keys are errors)."""
    raw = _check_class_path_sections(raw)
    cfg = _build(Config, raw, prefix="")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            root=_resolve_path(cfg.data.root, "data.root"),
            cache_dir=_resolve_path(cfg.data.cache_dir, "data.cache_dir"),
        ),
    )
    validate(cfg)
    return cfg


def data_config(raw: dict[str, Any], prefix: str) -> DataConfig:
    """A `data` section on its own (e.g. a DataModule's init_args): typed, paths resolved."""
    data = _build(DataConfig, raw, prefix)
    return dataclasses.replace(
        data,
        root=_resolve_path(data.root, f"{prefix}root"),
        cache_dir=_resolve_path(data.cache_dir, f"{prefix}cache_dir"),
    )


# What Linux's file systems take: a name (one path component) of 255 bytes, a path of 4096.
NAME_MAX = 255
PATH_MAX = 4096


def check_path_length(text: str, key: str) -> None:
    """Refuse a path the file system would refuse (a name over NAME_MAX bytes), naming `key`."""
    encoded = text.encode("utf-8", "surrogateescape")
    _check(len(encoded) <= PATH_MAX, key, f"is a path of {len(encoded)} bytes, over {PATH_MAX}")
    longest = max(encoded.split(b"/"), key=len)
    _check(
        len(longest) <= NAME_MAX,
        key,
        f"has a folder or file name of {len(longest)} bytes "
        f"({_show(longest.decode(errors='replace'))}); file systems allow {NAME_MAX}: shorten it",
    )


def _resolve_path(text: str, key: str) -> str:
    """`text` as an absolute path (`~` expanded), or a ConfigError naming `key`."""
    check_path_length(text, key)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # `~name` of a user this machine does not know
        user = text.split("/", 1)[0]
        raise ConfigError(
            f"{key}: cannot expand {_show(text)}: there is no user {_show(user[1:])} here; "
            "write the path out in full"
        ) from None
    try:
        return str(path.resolve())
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, an odd file system
        raise ConfigError(f"{key}: {_show(text)} is not a usable path ({err})") from None


def _check_class_path_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """A class_path module or DataModule brings its own settings: the built-in ones are errors.

    Checked on the raw sections, so a key written with its default value is refused too
    (it would silently do nothing). Returns `raw` with `model.name` null under a class path.
    """
    model, data, optimizer = (raw.get(name) for name in ("model", "data", "optimizer"))
    if isinstance(model, dict) and model.get("class_path") is not None:
        _check(
            model.get("name") is None,
            "model.name",
            "set either model.name (a built-in model) or model.class_path, not both",
        )
        raw = {**raw, "model": {**model, "name": None}}  # a copy: the caller's stays as given
        _check_absent(model, BUILTIN_MODEL_KEYS, "model", "model.init_args")
        if isinstance(optimizer, dict):
            _check_absent(
                optimizer, BUILTIN_OPTIMIZER_KEYS, "optimizer", "your module's configure_optimizers"
            )
    if isinstance(data, dict) and data.get("class_path") is not None:
        _check_absent(data, BUILTIN_DATA_KEYS, "data", "data.init_args")
    return raw


def _check_absent(section: dict[str, Any], keys: tuple[str, ...], name: str, where: str) -> None:
    given = [key for key in keys if key in section]
    _check(
        not given,
        f"{name}.{given[0] if given else ''}",
        f"configures the built-in {name} only, and {name.split('.')[0]}.class_path names "
        f"your own; set it in {where} instead",
    )


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from `raw`, checking every key and value type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'}: must be a section (mapping of keys), "
            f"not {_show(raw)}"
        )
    hints = typing.get_type_hints(cls, include_extras=True)  # NodeId is Annotated
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    if cls is TrainerConfig:
        # Every other Trainer keyword is accepted, checked against Trainer's signature.
        from fl_lightning.trainer_flags import trainer_extras

        raw = dict(raw)
        kwargs["extra"] = trainer_extras(
            {k: raw.pop(k) for k in list(raw) if k not in names or k == "extra"}
        )
    for key, value in raw.items():
        if key not in names:
            # Truncated: difflib is quadratic in the length of what it compares.
            close = difflib.get_close_matches(str(key)[:64], names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{prefix}{_key_text(key)}: unknown config key{hint}; known: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        _check(not required or f.name in kwargs, f"{prefix}{f.name}", "is required here")
    return cls(**kwargs)


def trainer_value(name: str, value: Any) -> Any:
    """`value` for `trainer.<name>`, checked and converted as a config file's would be."""
    hint = typing.get_type_hints(TrainerConfig)[name]
    return _coerce(value, hint, f"trainer.{name}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against type `hint`, converting only where it is lossless (int -> float)."""
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    if origin is Annotated:  # NodeId: an integer in uint64's range
        if not _is_uint64(value):
            raise ConfigError(f"{key}: {_show(value)} is not a node id (an integer in [0, 2**64))")
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        # Same type too: `True == 1` and `1.0 == 1` in Python, but not in a config.
        if not any(type(value) is type(a) and value == a for a in allowed):
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{key}: {_show(value)} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), key)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: {_show(value)} is not a mapping of names to values")
        return dict(value)
    if origin in (tuple, list):
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: {_show(value)} is not a list")
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint in (bool, int, float, str):
        return _coerce_scalar(value, hint, key)
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _is_uint64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _coerce_union(value: Any, options: tuple[Any, ...], key: str) -> Any:
    if value is None and type(None) in options:
        return None
    real = [o for o in options if o is not type(None)]
    if len(real) == 1:  # `float | None`: the float's own message says more
        if value is None:
            raise ConfigError(f"{key}: null is not allowed here; give a {_type_name(real[0])}")
        return _coerce(value, real[0], key)
    for option in real:
        try:
            return _coerce(value, option, key)
        except ConfigError:
            continue
    names = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key}: {_show(value)} is not {names}")


# Every integer ends up in torch or NumPy (seeds, sizes, counts), whose integers are int64.
_INT64_MAX = 2**63 - 1


def _coerce_scalar(value: Any, hint: type, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {_show(value)} is not true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {_show(value)} is not an integer")
        if abs(value) > _INT64_MAX:
            raise ConfigError(f"{key}: {_show(value)} is too large (at most 2**63 - 1)")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _parse_float(value, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: {_show(value)} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {_show(value)}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {_show(value)} is not a string")
    if "\0" in value:  # no path, name or address holds one; pathlib and torch raise on it
        raise ConfigError(f"{key}: {_show(value)} contains a NUL character")
    return value


def _parse_float(text: str, key: str) -> float:
    # YAML 1.1 reads `1e-3` (no dot) as a string; users mean the number.
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: {_show(text)} is not a number") from None


def _type_name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Reject values that are well-typed but meaningless, naming the key."""
    f, o, t = cfg.federation, cfg.optimizer, cfg.trainer
    _check(
        0 <= cfg.seed <= MAX_SEED,
        "seed",
        f"must be in [0, 2**32 - 1] (what lightning.seed_everything accepts), got {cfg.seed}",
    )
    _validate_classes(cfg)
    _validate_data(cfg)
    _validate_output(cfg.output)
    _check(
        0 <= cfg.model.label_smoothing < 1,
        "model.label_smoothing",
        f"must be in [0, 1), got {cfg.model.label_smoothing}",
    )
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    _check(o.warmup_rounds >= 0, "optimizer.warmup_rounds", f"must be >= 0, got {o.warmup_rounds}")
    _check(
        0 < o.round_decay <= 1, "optimizer.round_decay", f"must be in (0, 1], got {o.round_decay}"
    )
    _check(
        o.ema_decay is None or 0 < o.ema_decay < 1,
        "optimizer.ema_decay",
        f"must be in (0, 1) or null, got {o.ema_decay}",
    )
    _validate_federation(f, t)
    _validate_strategy(cfg)
    validate_trainer(cfg.trainer)
    _validate_privacy(cfg)
    _validate_secure_aggregation(cfg)


# lightning.seed_everything's bounds (lightning.fabric.utilities.seed.max_seed_value): NumPy
# seeds are uint32. tests/test_config.py checks that the two agree.
MAX_SEED = 2**32 - 1


def _validate_federation(f: FederationConfig, t: TrainerConfig) -> None:
    _check(f.num_clients >= 1, "federation.num_clients", f"must be >= 1, got {f.num_clients}")
    _check(f.num_rounds >= 1, "federation.num_rounds", f"must be >= 1, got {f.num_rounds}")
    _check(
        0.0 < f.fraction_train <= 1.0,
        "federation.fraction_train",
        f"must be in (0, 1], got {f.fraction_train}",
    )
    _check(
        0.0 <= f.fraction_evaluate <= 1.0,
        "federation.fraction_evaluate",
        f"must be in [0, 1], got {f.fraction_evaluate}",
    )
    _check(f.round_timeout > 0, "federation.round_timeout", f"must be > 0, got {f.round_timeout}")
    _check(
        f.node_ids is None or (len(f.node_ids) == f.num_clients == len(set(f.node_ids))),
        "federation.node_ids",
        f"must name {f.num_clients} distinct node ids, one per partition (federation."
        "num_clients), or be null",
    )
    _check(
        1 <= f.min_train_clients <= sampled_clients(f),
        "federation.min_train_clients",
        f"must be between 1 and the {sampled_clients(f)} clients sampled per round, "
        f"got {f.min_train_clients}",
    )
    r = f.client_resources
    _check(r.num_cpus > 0, "federation.client_resources.num_cpus", f"must be > 0, got {r.num_cpus}")
    _check(
        r.num_gpus >= 0, "federation.client_resources.num_gpus", f"must be >= 0, got {r.num_gpus}"
    )
    _check(
        not (r.num_gpus > 0 and t.accelerator == "cpu"),
        "trainer.accelerator",
        "is 'cpu' while federation.client_resources.num_gpus > 0; set trainer.accelerator=gpu",
    )


def _validate_output(o: OutputConfig) -> None:
    for key, value in (("root", o.root), ("dir", o.dir), ("experiment", o.experiment)):
        if value is not None:
            check_path_length(value, f"output.{key}")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _check(
        0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}"
    )
    _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {d.eval_batch_size}")
    for name in ("max_train_samples", "max_test_samples"):
        cap = getattr(d, name)
        _check(cap is None or cap >= 1, f"data.{name}", f"must be >= 1 or null, got {cap}")
    _check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _check(
        d.shards_per_client >= 1,
        "data.shards_per_client",
        f"must be >= 1, got {d.shards_per_client}",
    )
    n = d.noise
    _check(n.std >= 0, "data.noise.std", f"must be >= 0, got {n.std}")
    _check(
        0 <= n.label_fraction <= 1,
        "data.noise.label_fraction",
        f"must be in [0, 1], got {n.label_fraction}",
    )
    bad = [c for c in n.clients if not 0 <= c < cfg.federation.num_clients]
    _check(
        not bad,
        "data.noise.clients",
        f"{bad} are not client ids (0 to {cfg.federation.num_clients - 1})",
    )
    if d.dataset == "imagefolder":
        _check(
            d.image_size is not None and d.image_size >= 1,
            "data.image_size",
            "is required for dataset 'imagefolder' (images are resized to this square size)",
        )


# What fl-lightning passes a data.class_path DataModule that takes them (the federated
# contract of fl_lightning.client_data): which client it serves, out of how many.
PARTITION_ARGS = ("partition_id", "num_partitions")


def _validate_classes(cfg: Config) -> None:
    """Import the classes the config names and check their init_args against them."""
    m, d = cfg.model, cfg.data
    _check(
        m.name is not None or m.class_path is not None,
        "model.name",
        "is null: name a built-in model or set model.class_path",
    )
    _check(
        d.partition != "site",
        "data.partition",
        "site is set by a SuperNode whose node config names its own data-root; in a config, "
        "use iid, dirichlet or shards",
    )
    if m.class_path is None and d.class_path is None:
        return
    import inspect

    import lightning.pytorch as pl

    from fl_lightning.class_path import check_init_args, import_class

    if m.class_path is not None:
        module = import_class(m.class_path, "model.class_path", pl.LightningModule)
        check_init_args(module, m.init_args, "model", given=set())
    if d.class_path is not None:
        _check(
            m.name is None,
            "model.name",
            f"the built-in {m.name} trains on the built-in datasets; with data.class_path, "
            "name your module by model.class_path",
        )
        datamodule = import_class(d.class_path, "data.class_path", pl.LightningDataModule)
        takes = set(PARTITION_ARGS) & set(inspect.signature(datamodule).parameters)
        _check(
            len(takes) != 1,
            "data.class_path",
            f"{d.class_path} takes {', '.join(takes)} but not "
            f"{', '.join(set(PARTITION_ARGS) - takes)}: a DataModule that loads one client's "
            "share takes both (or neither, to have fl-lightning partition it)",
        )
        check_init_args(datamodule, d.init_args, "data", given=takes)
    _check(
        not cfg.output.client_report,
        "output.client_report",
        "is built for the built-in models and datasets (the noisy-clients experiment); "
        "set it to false",
    )


def _validate_strategy(cfg: Config) -> None:
    # Each parameter is checked whichever strategy is named: a wrong value is a typo either
    # way, and switching strategy.name must not bring an unchecked one into play.
    s = cfg.strategy
    _check(s.proximal_mu >= 0, "strategy.proximal_mu", f"must be >= 0, got {s.proximal_mu}")
    # FedOpt (FedAdam, FedYogi, FedAdagrad): x + eta * m / (sqrt(v) + tau), where
    # m and v are exponential averages with factors beta_1 and beta_2.
    _check(s.eta > 0, "strategy.eta", f"must be > 0 (the server learning rate), got {s.eta}")
    _check(
        s.tau > 0,
        "strategy.tau",
        f"must be > 0 (it keeps the server step finite where v is 0), got {s.tau}",
    )
    for name in ("beta_1", "beta_2"):
        value = getattr(s, name)
        _check(0 <= value < 1, f"strategy.{name}", f"must be in [0, 1), got {value}")
    _check(
        s.server_learning_rate > 0,
        "strategy.server_learning_rate",
        f"must be > 0, got {s.server_learning_rate}",
    )
    _check(
        0 <= s.server_momentum < 1,
        "strategy.server_momentum",
        f"must be in [0, 1), got {s.server_momentum}",
    )
    _check(0 <= s.beta < 0.5, "strategy.beta", f"must be in [0, 0.5), got {s.beta}")
    f = s.num_malicious_clients
    _check(f >= 0, "strategy.num_malicious_clients", f"must be >= 0, got {f}")
    sampled = sampled_clients(cfg.federation)
    # Krum scores each update by its n - f - 2 nearest others, and tolerates f attackers
    # only when n > 2f + 2 (Blanchard et al., 2017).
    _check(
        s.name != "krum" or sampled > 2 * f + 2,
        "strategy.num_malicious_clients",
        f"krum tolerates {f} malicious clients only with more than {2 * f + 2} clients "
        f"sampled per round, and {sampled} are; lower it or sample more clients",
    )
    _check(
        s.batchnorm_batches >= 1,
        "strategy.batchnorm_batches",
        f"must be >= 1, got {s.batchnorm_batches}",
    )
    _check(
        s.update_norm_factor is None or s.update_norm_factor > 1,
        "strategy.update_norm_factor",
        f"must be > 1 (a multiple of the round's median update norm) or null, "
        f"got {s.update_norm_factor}",
    )
    _check(
        s.max_update_norm is None or s.max_update_norm > 0,
        "strategy.max_update_norm",
        f"must be > 0 or null, got {s.max_update_norm}",
    )


# Strategies whose aggregate is the (weighted) mean of the updates: the only ones the DP
# noise calibration and SecAgg+'s secure sum are defined for.
MEAN_STRATEGIES = ("fedavg", "fedprox")


def sampled_clients(f: FederationConfig) -> int:
    """Clients Flower samples for training each round (fraction_train of num_clients, >= 1)."""
    return max(int(f.num_clients * f.fraction_train), 1)


def check_private_devices(cfg: Config) -> None:
    """DP-SGD keeps each client on one device (the config's, or a site's override)."""
    _check(
        cfg.privacy.mode != "dp_sgd" or device_count(cfg.trainer) == 1,
        "trainer.devices",
        "DP-SGD trains each client on one device (Opacus's per-sample gradients are not "
        "wired into DDP here); set trainer.devices=1",
    )


def _validate_privacy(cfg: Config) -> None:
    p, t, s = cfg.privacy, cfg.trainer, cfg.strategy
    if p.mode == "none":
        return
    _check(0 < p.delta < 1, "privacy.delta", f"must be in (0, 1), got {p.delta}")
    _check(
        (p.noise_multiplier is None) != (p.target_epsilon is None),
        "privacy.noise_multiplier",
        f"privacy.mode={p.mode} needs exactly one of privacy.noise_multiplier and "
        "privacy.target_epsilon",
    )
    _check(
        p.noise_multiplier is None or p.noise_multiplier > 0,
        "privacy.noise_multiplier",
        f"must be > 0, got {p.noise_multiplier}",
    )
    _check(
        p.target_epsilon is None or p.target_epsilon > 0,
        "privacy.target_epsilon",
        f"must be > 0, got {p.target_epsilon}",
    )
    _check(
        p.max_epsilon is None or p.max_epsilon > 0,
        "privacy.max_epsilon",
        f"must be > 0 or null, got {p.max_epsilon}",
    )
    _check(
        p.mode == "none" or s.batchnorm == "average",
        "strategy.batchnorm",
        f"recompute sends statistics of the clients' data that privacy.mode={p.mode} does "
        f"not cover; use strategy.batchnorm=average",
    )
    if p.mode == "dp_sgd":
        _check(p.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {p.max_grad_norm}")
        _check(
            t.gradient_clip_val is None,
            "trainer.gradient_clip_val",
            "Lightning's gradient clipping does nothing under DP-SGD (Opacus clips each "
            "sample's gradient to privacy.max_grad_norm); set trainer.gradient_clip_val=null",
        )
        _check(
            t.accumulate_grad_batches == 1,
            "trainer.accumulate_grad_batches",
            "must be 1 under DP-SGD (each Poisson-sampled batch is one private step)",
        )
        _check(
            t.limit_train_batches is None,
            "trainer.limit_train_batches",
            "must be null under DP-SGD (the privacy accounting assumes full epochs)",
        )
        check_private_devices(cfg)
        _check(
            s.name != "fedprox",
            "strategy.name",
            "fedprox's proximal term is not a per-sample loss, so DP-SGD cannot clip it; "
            "use fedavg",
        )
    if p.mode == "client_dp":
        _check(p.clipping_norm > 0, "privacy.clipping_norm", f"must be > 0, got {p.clipping_norm}")
        _check(
            s.name in MEAN_STRATEGIES,
            "strategy.name",
            f"client_dp adds noise calibrated to a mean of clipped updates; {s.name} is not "
            f"a mean (use one of {', '.join(MEAN_STRATEGIES)})",
        )


def _validate_secure_aggregation(cfg: Config) -> None:
    a = cfg.secure_aggregation
    if not a.enabled:
        return
    sampled = sampled_clients(cfg.federation)
    # Flower reads an integer 1 as the fraction 1.0, so both counts start at 2 (and 3).
    _check(a.num_shares >= 3, "secure_aggregation.num_shares", f"must be >= 3, got {a.num_shares}")
    _check(
        a.num_shares <= sampled,
        "secure_aggregation.num_shares",
        f"is {a.num_shares}, but only {sampled} clients are sampled per round",
    )
    _check(
        a.num_shares % 2 == 1 or a.num_shares == sampled,
        "secure_aggregation.num_shares",
        f"is {a.num_shares}: SecAgg+ shares with neighbours on both sides of a ring, so it "
        f"must be odd or equal to the clients sampled per round ({sampled})",
    )
    _check(
        2 <= a.reconstruction_threshold < a.num_shares,
        "secure_aggregation.reconstruction_threshold",
        f"must be at least 2 and below secure_aggregation.num_shares ({a.num_shares}), "
        f"got {a.reconstruction_threshold}",
    )
    _check(
        a.clipping_range > 0,
        "secure_aggregation.clipping_range",
        f"must be > 0, got {a.clipping_range}",
    )
    _check(
        0 < a.quantization_range < 2**32,
        "secure_aggregation.quantization_range",
        f"must be in (0, 2**32), got {a.quantization_range}",
    )
    _check(
        a.max_weight is None or a.max_weight > 0,
        "secure_aggregation.max_weight",
        f"must be > 0 or null, got {a.max_weight}",
    )
    _check(
        cfg.strategy.name == "fedavg",
        "strategy.name",
        f"secure aggregation runs FedAvg (the server only sees a sum); got {cfg.strategy.name}",
    )
    _check(
        cfg.strategy.batchnorm == "average",
        "strategy.batchnorm",
        "recompute sends each client's statistics in the clear, outside the secure sum; "
        "use strategy.batchnorm=average",
    )
    _check(
        cfg.privacy.mode != "client_dp" or cfg.privacy.clipping == "client",
        "privacy.clipping",
        "must be 'client' with secure aggregation: the server cannot clip updates it cannot see",
    )
