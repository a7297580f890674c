"""The run configuration's schema: typed, frozen sections and the facts derived from them.

Only dataclasses and small pure helpers live here: how a config is read, coerced and
checked is `load`, `coerce` and `validate`, which all build on this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fl_lightning.config.class_path import ClassSpec

DatasetName = Literal["mnist", "cifar10", "imagefolder"]
ModelName = Literal["mnist_net", "cifar10_net", "mlp"]

# A Flower node id: an unsigned 64-bit integer (config integers are otherwise int64).
NodeId = Annotated[int, "uint64"]

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
    # Any LightningDataModule instead of a built-in dataset (see fl_lightning.data.loaders
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
    # Validation inside each client's fit, on its held-out data (Lightning's default, 1.0,
    # validates every epoch). 0: clients validate only in the server's evaluate messages.
    # A scheduler or callback monitoring a validation metric needs it > 0.
    limit_val_batches: int | float = 0
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
class EarlyStoppingConfig:
    """End the run when a round metric stops improving (monitor null: never)."""

    monitor: str | None = None  # a round metric as metrics.jsonl names it, e.g. test/loss
    mode: Literal["min", "max"] = "min"
    patience: int = 3  # rounds after the best round without an improvement of min_delta
    min_delta: float = 0.0


@dataclass(frozen=True)
class BestCheckpointConfig:
    """Keep `checkpoints/best.ckpt`, the global model of the best round (monitor null: no)."""

    monitor: str | None = None
    mode: Literal["min", "max"] = "min"


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
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Each client's optimizer, scheduler and AMP scaler state continue across the rounds it
    # takes part in, kept on its own disk under output.dir (fl_lightning.client.state).
    stateful_clients: bool = False


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
        "scaffold",
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
    # The update screen (fl_lightning.server.update_screen): a reply whose update (its weights
    # minus the global model's, L2 norm over every floating-point array) is more than
    # update_norm_factor times the median of the round's updates is rejected (null: off);
    # so is one over max_update_norm, for users who know their updates' scale. 100: far
    # above what honest clients of unequal sizes differ by, far below a poisoned update.
    # Personal layers: state-dict entries whose names fully match one of these regular
    # expressions never leave a client and are not averaged; each client keeps its own
    # (FedBN: '.*bn.*'; FedPer: the head). The server tests with their initial values.
    local_parameters: tuple[str, ...] = ()
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
    # dp_sgd: each Poisson-sampled batch goes through the module in chunks of at most this
    # many samples, and the optimizer steps once per batch (Opacus's BatchMemoryManager):
    # the same private step, with per-sample gradients held for one chunk at a time.
    max_physical_batch_size: int | None = None
    # dp_sgd: how each sample's gradient norm is found. "fast": from each Linear and Conv2d
    # layer's input and output gradient, with no per-sample gradients for Linear layers
    # (`fl_lightning.privacy.fast_clipping`); a module with any other trainable layer gets
    # "hooks": Opacus's per-sample gradients of every layer. The same clipping either way.
    grad_sample_mode: Literal["fast", "hooks"] = "fast"
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
class EvaluationConfig:
    """The server's centralized evaluation of the global model on its test data."""

    # Every k-th round (round 0, the initial model, included), and always the last one.
    every_n_rounds: int = 1
    # A seeded subset of this many test samples (null: the whole test split).
    max_samples: int | None = None


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
    # Lightning loggers by class_path + init_args (CSVLogger, MLFlowLogger, WandbLogger, or
    # your own Logger), each getting the server's round metrics (step = round) and the
    # config as hyperparameters, besides TensorBoard. `save_dir`, where a logger takes
    # one and init_args leave it out, is the run directory.
    loggers: tuple[ClassSpec, ...] = ()
    best_checkpoint: BestCheckpointConfig = field(default_factory=BestCheckpointConfig)


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
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as written to the run's config.yaml (and loaded back)."""
        tree = dataclasses.asdict(self)
        trainer = tree["trainer"]
        trainer.update(trainer.pop("extra"))  # written flat under trainer:, as users write it
        trainer["callbacks"] = list(trainer["callbacks"])
        tree["output"]["loggers"] = list(tree["output"]["loggers"])
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


# What fl-lightning passes a data.class_path DataModule that takes them (the federated
# contract of fl_lightning.data.loaders): which client it serves, out of how many.
PARTITION_ARGS = ("partition_id", "num_partitions")


# Strategies whose aggregate is the (weighted) mean of the updates: the only ones the DP
# noise calibration and SecAgg+'s secure sum are defined for.
MEAN_STRATEGIES = ("fedavg", "fedprox")


def sampled_clients(f: FederationConfig) -> int:
    """Clients Flower samples for training each round (fraction_train of num_clients, >= 1)."""
    return sample_size(f.num_clients, f.fraction_train)


def keeps_client_state(cfg: Config) -> bool:
    """Whether clients keep state on their disk between rounds: their optimizers
    (`stateful_clients`), SCAFFOLD's c_i, or personal layers."""
    return bool(
        cfg.federation.stateful_clients
        or cfg.strategy.name == "scaffold"
        or cfg.strategy.local_parameters
    )


def sample_size(available: int, fraction: float) -> int:
    """How many of `available` clients a round samples at `fraction`: Flower's rule, >= 1."""
    return max(int(available * fraction), 1)


def sends_label_counts(cfg: Config) -> bool:
    """Whether clients tell the census their label counts: only with no privacy mechanism on.

    Under differential privacy or secure aggregation a client's label mix is exactly what
    the mechanism keeps from the server, so clients send only their partition sizes; so
    do clients of a `data.class_path` DataModule, whose labels fl-lightning does not know.
    """
    return (
        cfg.privacy.mode == "none"
        and not cfg.secure_aggregation.enabled
        and cfg.data.class_path is None
    )


def centrally_evaluated(cfg: Config, server_round: int) -> bool:
    """Whether the server tests the global model of `server_round` (0: the initial model):
    every `evaluation.every_n_rounds`-th round and the run's last."""
    every = cfg.evaluation.every_n_rounds
    return server_round % every == 0 or server_round >= cfg.federation.num_rounds


def round_lr_factor(o: OptimizerConfig, server_round: int) -> float:
    """What the module's learning rates are multiplied by in `server_round` (1-based):
    linear warmup over `warmup_rounds`, then `round_decay` per round."""
    warmup = min(1.0, server_round / o.warmup_rounds) if o.warmup_rounds else 1.0
    return warmup * o.round_decay ** (server_round - 1)
