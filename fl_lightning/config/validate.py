"""Checking a typed config: values that are well-typed but meaningless, named by key.

Each rule names the key it guards in its one-line ConfigError; cross-field rules sit with
the section they guard (data, classes, federation, strategy), and privacy's and secure
aggregation's in `privacy_rules`.
"""

from __future__ import annotations

from fl_lightning.config.privacy_rules import validate_privacy, validate_secure_aggregation
from fl_lightning.config.schema import (
    PARTITION_ARGS,
    Config,
    EvaluationConfig,
    FederationConfig,
    OutputConfig,
    TrainerConfig,
    sampled_clients,
)
from fl_lightning.config.trainer_flags import validate_trainer
from fl_lightning.errors import ConfigError, check, show

# What Linux's file systems take: a name (one path component) of 255 bytes, a path of 4096.
NAME_MAX = 255


PATH_MAX = 4096


def check_path_length(text: str, key: str) -> None:
    """Refuse a path the file system would refuse (a name over NAME_MAX bytes), naming `key`."""
    encoded = text.encode("utf-8", "surrogateescape")
    check(len(encoded) <= PATH_MAX, key, f"is a path of {len(encoded)} bytes, over {PATH_MAX}")
    longest = max(encoded.split(b"/"), key=len)
    check(
        len(longest) <= NAME_MAX,
        key,
        f"has a folder or file name of {len(longest)} bytes "
        f"({show(longest.decode(errors='replace'))}); file systems allow {NAME_MAX}: shorten it",
    )


def validate(cfg: Config) -> None:
    """Reject values that are well-typed but meaningless, naming the key."""
    f, o, t = cfg.federation, cfg.optimizer, cfg.trainer
    check(
        0 <= cfg.seed <= MAX_SEED,
        "seed",
        f"must be in [0, 2**32 - 1] (what lightning.seed_everything accepts), got {cfg.seed}",
    )
    _validate_classes(cfg)
    _validate_data(cfg)
    _validate_output(cfg.output)
    _validate_evaluation(cfg.evaluation)
    _validate_watches(cfg)
    _validate_stateful_clients(cfg)
    check(
        0 <= cfg.model.label_smoothing < 1,
        "model.label_smoothing",
        f"must be in [0, 1), got {cfg.model.label_smoothing}",
    )
    check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    check(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    check(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    check(o.warmup_rounds >= 0, "optimizer.warmup_rounds", f"must be >= 0, got {o.warmup_rounds}")
    check(
        0 < o.round_decay <= 1, "optimizer.round_decay", f"must be in (0, 1], got {o.round_decay}"
    )
    check(
        o.ema_decay is None or 0 < o.ema_decay < 1,
        "optimizer.ema_decay",
        f"must be in (0, 1) or null, got {o.ema_decay}",
    )
    _validate_federation(f, t)
    _validate_strategy(cfg)
    validate_trainer(cfg.trainer, cfg.output.client_logs)
    _validate_fit_validation(cfg)
    validate_privacy(cfg)
    validate_secure_aggregation(cfg)


# lightning.seed_everything's bounds (lightning.fabric.utilities.seed.max_seed_value): NumPy
# seeds are uint32. tests/test_config.py checks that the two agree.
MAX_SEED = 2**32 - 1


def _validate_federation(f: FederationConfig, t: TrainerConfig) -> None:
    check(f.num_clients >= 1, "federation.num_clients", f"must be >= 1, got {f.num_clients}")
    check(f.num_rounds >= 1, "federation.num_rounds", f"must be >= 1, got {f.num_rounds}")
    check(
        0.0 < f.fraction_train <= 1.0,
        "federation.fraction_train",
        f"must be in (0, 1], got {f.fraction_train}",
    )
    check(
        0.0 <= f.fraction_evaluate <= 1.0,
        "federation.fraction_evaluate",
        f"must be in [0, 1], got {f.fraction_evaluate}",
    )
    check(f.round_timeout > 0, "federation.round_timeout", f"must be > 0, got {f.round_timeout}")
    check(
        f.node_ids is None or (len(f.node_ids) == f.num_clients == len(set(f.node_ids))),
        "federation.node_ids",
        f"must name {f.num_clients} distinct node ids, one per partition (federation."
        "num_clients), or be null",
    )
    check(
        1 <= f.min_train_clients <= sampled_clients(f),
        "federation.min_train_clients",
        f"must be between 1 and the {sampled_clients(f)} clients sampled per round, "
        f"got {f.min_train_clients}",
    )
    r = f.client_resources
    check(r.num_cpus > 0, "federation.client_resources.num_cpus", f"must be > 0, got {r.num_cpus}")
    check(
        r.num_gpus >= 0, "federation.client_resources.num_gpus", f"must be >= 0, got {r.num_gpus}"
    )
    check(
        not (r.num_gpus > 0 and t.accelerator == "cpu"),
        "trainer.accelerator",
        "is 'cpu' while federation.client_resources.num_gpus > 0; set trainer.accelerator=gpu",
    )


def _validate_fit_validation(cfg: Config) -> None:
    """`trainer.limit_val_batches` (validation inside each client's fit): no callback
    watching a validation metric where it is off."""
    limit = cfg.trainer.limit_val_batches
    check(
        limit >= 0 and (limit <= 1 or float(limit).is_integer()),
        "trainer.limit_val_batches",
        f"must be 0 (no validation inside fit), a share in (0, 1] or a number of batches, "
        f"got {limit}",
    )
    if limit:
        return  # that clients hold validation data is checked with the data (cli._prepare)
    for index, spec in enumerate(cfg.trainer.callbacks):
        monitor = spec.init_args.get("monitor")
        check(
            not (isinstance(monitor, str) and monitor.startswith("val")),
            f"trainer.callbacks[{index}].init_args.monitor",
            f"{monitor!r} is a validation metric, and clients validate inside fit only with "
            "trainer.limit_val_batches > 0; set it (e.g. trainer.limit_val_batches=1.0)",
        )


def _validate_stateful_clients(cfg: Config) -> None:
    """What `federation.stateful_clients` cannot continue."""
    if not cfg.federation.stateful_clients:
        return
    o = cfg.optimizer
    check(
        o.warmup_rounds == 0 and o.round_decay == 1.0,
        "federation.stateful_clients",
        "continues each client's optimizer and schedulers, and optimizer.warmup_rounds / "
        "round_decay rescale a fresh one every round; schedule the learning rate in the "
        "module's configure_optimizers instead, or set stateful_clients=false",
    )


def _validate_watches(cfg: Config) -> None:
    """`federation.early_stopping` and `output.best_checkpoint`."""
    e = cfg.federation.early_stopping
    for key, monitor in (
        ("federation.early_stopping.monitor", e.monitor),
        ("output.best_checkpoint.monitor", cfg.output.best_checkpoint.monitor),
    ):
        check(monitor is None or monitor.strip() != "", key, "is empty; name a round metric")
    check(e.patience >= 1, "federation.early_stopping.patience", f"must be >= 1, got {e.patience}")
    check(
        e.min_delta >= 0,
        "federation.early_stopping.min_delta",
        f"must be >= 0, got {e.min_delta}",
    )


def _validate_evaluation(e: EvaluationConfig) -> None:
    every = e.every_n_rounds
    check(every >= 1, "evaluation.every_n_rounds", f"must be >= 1, got {every}")
    cap = e.max_samples
    check(cap is None or cap >= 1, "evaluation.max_samples", f"must be >= 1 or null, got {cap}")


def _validate_output(o: OutputConfig) -> None:
    for key, value in (("root", o.root), ("dir", o.dir), ("experiment", o.experiment)):
        if value is not None:
            check_path_length(value, f"output.{key}")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    check(
        0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}"
    )
    check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    check(d.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {d.eval_batch_size}")
    for name in ("max_train_samples", "max_test_samples"):
        cap = getattr(d, name)
        check(cap is None or cap >= 1, f"data.{name}", f"must be >= 1 or null, got {cap}")
    check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    check(
        d.shards_per_client >= 1,
        "data.shards_per_client",
        f"must be >= 1, got {d.shards_per_client}",
    )
    n = d.noise
    check(n.std >= 0, "data.noise.std", f"must be >= 0, got {n.std}")
    check(
        0 <= n.label_fraction <= 1,
        "data.noise.label_fraction",
        f"must be in [0, 1], got {n.label_fraction}",
    )
    bad = [c for c in n.clients if not 0 <= c < cfg.federation.num_clients]
    check(
        not bad,
        "data.noise.clients",
        f"{bad} are not client ids (0 to {cfg.federation.num_clients - 1})",
    )
    if d.dataset == "imagefolder":
        check(
            d.image_size is not None and d.image_size >= 1,
            "data.image_size",
            "is required for dataset 'imagefolder' (images are resized to this square size)",
        )


def _validate_classes(cfg: Config) -> None:
    """Import the classes the config names (nested ones too) and check their init_args."""
    m, d = cfg.model, cfg.data
    check(
        m.name is not None or m.class_path is not None,
        "model.name",
        "is null: name a built-in model or set model.class_path",
    )
    check(
        d.partition != "site",
        "data.partition",
        "site is set by a SuperNode whose node config names its own data-root; in a config, "
        "use iid, dirichlet or shards",
    )
    if m.class_path is None and d.class_path is None:
        return
    import inspect

    import lightning.pytorch as pl

    from fl_lightning.config.class_path import check_init_args, import_class

    if m.class_path is not None:
        module = import_class(m.class_path, "model.class_path", pl.LightningModule)
        check_init_args(module, m.init_args, "model", given=set())
    if d.class_path is not None:
        check(
            m.name is None,
            "model.name",
            f"the built-in {m.name} trains on the built-in datasets; with data.class_path, "
            "name your module by model.class_path",
        )
        datamodule = import_class(d.class_path, "data.class_path", pl.LightningDataModule)
        takes = set(PARTITION_ARGS) & set(inspect.signature(datamodule).parameters)
        check(
            len(takes) != 1,
            "data.class_path",
            f"{d.class_path} takes {', '.join(takes)} but not "
            f"{', '.join(set(PARTITION_ARGS) - takes)}: a DataModule that loads one client's "
            "share takes both (or neither, to have fl-lightning partition it)",
        )
        check_init_args(datamodule, d.init_args, "data", given=takes)
    check(
        not cfg.output.client_report,
        "output.client_report",
        "is built for the built-in models and datasets (the noisy-clients experiment); "
        "set it to false",
    )


def _validate_local_parameters(cfg: Config) -> None:
    """`strategy.local_parameters`: patterns that compile, on a run that can keep them out."""
    import re

    s = cfg.strategy
    for index, pattern in enumerate(s.local_parameters):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"strategy.local_parameters[{index}]: {pattern!r} is not a regular expression "
                f"({err})"
            ) from None
    check(
        s.name in ("fedavg", "fedprox"),
        "strategy.local_parameters",
        f"works with fedavg and fedprox, whose aggregate is a mean of what clients send; "
        f"{s.name} is not (yet)",
    )
    check(
        cfg.privacy.mode == "none" and not cfg.secure_aggregation.enabled,
        "strategy.local_parameters",
        "is not yet combined with privacy.mode or secure aggregation; use one or the other",
    )
    check(
        s.batchnorm == "average",
        "strategy.local_parameters",
        "keeps layers on the clients; strategy.batchnorm=recompute would measure them on the "
        "server's model: use strategy.batchnorm=average",
    )


def _validate_strategy(cfg: Config) -> None:
    # Each parameter is checked whichever strategy is named: a wrong value is a typo either
    # way, and switching strategy.name must not bring an unchecked one into play.
    s = cfg.strategy
    check(s.proximal_mu >= 0, "strategy.proximal_mu", f"must be >= 0, got {s.proximal_mu}")
    if s.local_parameters:
        _validate_local_parameters(cfg)
    # FedOpt (FedAdam, FedYogi, FedAdagrad): x + eta * m / (sqrt(v) + tau), where
    # m and v are exponential averages with factors beta_1 and beta_2.
    check(s.eta > 0, "strategy.eta", f"must be > 0 (the server learning rate), got {s.eta}")
    check(
        s.tau > 0,
        "strategy.tau",
        f"must be > 0 (it keeps the server step finite where v is 0), got {s.tau}",
    )
    for name in ("beta_1", "beta_2"):
        value = getattr(s, name)
        check(0 <= value < 1, f"strategy.{name}", f"must be in [0, 1), got {value}")
    check(
        s.server_learning_rate > 0,
        "strategy.server_learning_rate",
        f"must be > 0, got {s.server_learning_rate}",
    )
    check(
        0 <= s.server_momentum < 1,
        "strategy.server_momentum",
        f"must be in [0, 1), got {s.server_momentum}",
    )
    check(0 <= s.beta < 0.5, "strategy.beta", f"must be in [0, 0.5), got {s.beta}")
    f = s.num_malicious_clients
    check(f >= 0, "strategy.num_malicious_clients", f"must be >= 0, got {f}")
    sampled = sampled_clients(cfg.federation)
    # Krum scores each update by its n - f - 2 nearest others, and tolerates f attackers
    # only when n > 2f + 2 (Blanchard et al., 2017).
    check(
        s.name != "krum" or sampled > 2 * f + 2,
        "strategy.num_malicious_clients",
        f"krum tolerates {f} malicious clients only with more than {2 * f + 2} clients "
        f"sampled per round, and {sampled} are; lower it or sample more clients",
    )
    check(
        s.batchnorm_batches >= 1,
        "strategy.batchnorm_batches",
        f"must be >= 1, got {s.batchnorm_batches}",
    )
    check(
        s.update_norm_factor is None or s.update_norm_factor > 1,
        "strategy.update_norm_factor",
        f"must be > 1 (a multiple of the round's median update norm) or null, "
        f"got {s.update_norm_factor}",
    )
    check(
        s.max_update_norm is None or s.max_update_norm > 0,
        "strategy.max_update_norm",
        f"must be > 0 or null, got {s.max_update_norm}",
    )
