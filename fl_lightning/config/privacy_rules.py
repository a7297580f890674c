"""Rules for differential privacy and secure aggregation: what each mode asks of the config.

Kept apart from the general rules (`validate`) because they guard one feature across
sections (privacy, trainer, strategy, secure_aggregation); `check_client_devices` (DP-SGD
and SCAFFOLD train a client on one device) is also applied per site (`node_config`) and
by the client before it trains.
"""

from __future__ import annotations

from fl_lightning.config.schema import MEAN_STRATEGIES, Config, sampled_clients
from fl_lightning.config.trainer_flags import device_count
from fl_lightning.errors import check


def check_client_devices(cfg: Config) -> None:
    """DP-SGD and SCAFFOLD keep each client on one device (the config's, or a site's)."""
    one = device_count(cfg.trainer) == 1
    check(
        cfg.privacy.mode != "dp_sgd" or one,
        "trainer.devices",
        "DP-SGD trains each client on one device (Opacus's per-sample gradients are not "
        "wired into DDP here); set trainer.devices=1",
    )
    check(
        cfg.strategy.name != "scaffold" or one,
        "trainer.devices",
        "scaffold trains each client on one device (the change of its control variate is "
        "not gathered from DDP's ranks); set trainer.devices=1",
    )


def validate_privacy(cfg: Config) -> None:
    """The privacy section's rules, and what each mode asks of the rest of the config."""
    p, s = cfg.privacy, cfg.strategy
    check(
        p.max_physical_batch_size is None or p.mode == "dp_sgd",
        "privacy.max_physical_batch_size",
        f"splits DP-SGD's batches; privacy.mode is {p.mode}: leave it null",
    )
    check_client_devices(cfg)
    if p.mode == "none":
        return
    check(0 < p.delta < 1, "privacy.delta", f"must be in (0, 1), got {p.delta}")
    check(
        s.name != "scaffold",
        "strategy.name",
        f"scaffold's clients send the change of their control variates in the clear, which "
        f"privacy.mode={p.mode} does not cover; use fedavg or fedprox",
    )
    check(
        (p.noise_multiplier is None) != (p.target_epsilon is None),
        "privacy.noise_multiplier",
        f"privacy.mode={p.mode} needs exactly one of privacy.noise_multiplier and "
        "privacy.target_epsilon",
    )
    check(
        p.noise_multiplier is None or p.noise_multiplier > 0,
        "privacy.noise_multiplier",
        f"must be > 0, got {p.noise_multiplier}",
    )
    check(
        p.target_epsilon is None or p.target_epsilon > 0,
        "privacy.target_epsilon",
        f"must be > 0, got {p.target_epsilon}",
    )
    check(
        p.max_epsilon is None or p.max_epsilon > 0,
        "privacy.max_epsilon",
        f"must be > 0 or null, got {p.max_epsilon}",
    )
    check(
        p.mode == "none" or s.batchnorm == "average",
        "strategy.batchnorm",
        f"recompute sends statistics of the clients' data that privacy.mode={p.mode} does "
        f"not cover; use strategy.batchnorm=average",
    )
    if p.mode == "dp_sgd":
        _validate_dp_sgd(cfg)
    if p.mode == "client_dp":
        _validate_client_dp(cfg)


def _validate_dp_sgd(cfg: Config) -> None:
    p, t, s = cfg.privacy, cfg.trainer, cfg.strategy
    check(p.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {p.max_grad_norm}")
    size = p.max_physical_batch_size
    check(size is None or size >= 1, "privacy.max_physical_batch_size", f"must be >= 1, got {size}")
    check(
        t.gradient_clip_val is None,
        "trainer.gradient_clip_val",
        "Lightning's gradient clipping does nothing under DP-SGD (Opacus clips each "
        "sample's gradient to privacy.max_grad_norm); set trainer.gradient_clip_val=null",
    )
    check(
        t.accumulate_grad_batches == 1,
        "trainer.accumulate_grad_batches",
        "must be 1 under DP-SGD (each Poisson-sampled batch is one private step)",
    )
    check(
        t.limit_train_batches is None,
        "trainer.limit_train_batches",
        "must be null under DP-SGD (the privacy accounting assumes full epochs)",
    )
    check(
        s.name != "fedprox",
        "strategy.name",
        "fedprox's proximal term is not a per-sample loss, so DP-SGD cannot clip it; use fedavg",
    )


def _validate_client_dp(cfg: Config) -> None:
    p, s = cfg.privacy, cfg.strategy
    check(p.clipping_norm > 0, "privacy.clipping_norm", f"must be > 0, got {p.clipping_norm}")
    check(
        s.name in MEAN_STRATEGIES,
        "strategy.name",
        f"client_dp adds noise calibrated to a mean of clipped updates; {s.name} is not "
        f"a mean (use one of {', '.join(MEAN_STRATEGIES)})",
    )


def validate_secure_aggregation(cfg: Config) -> None:
    """SecAgg+'s own bounds, and what it asks of the strategy and of client_dp."""
    a = cfg.secure_aggregation
    if not a.enabled:
        return
    sampled = sampled_clients(cfg.federation)
    # Flower reads an integer 1 as the fraction 1.0, so both counts start at 2 (and 3).
    check(a.num_shares >= 3, "secure_aggregation.num_shares", f"must be >= 3, got {a.num_shares}")
    check(
        a.num_shares <= sampled,
        "secure_aggregation.num_shares",
        f"is {a.num_shares}, but only {sampled} clients are sampled per round",
    )
    check(
        a.num_shares % 2 == 1 or a.num_shares == sampled,
        "secure_aggregation.num_shares",
        f"is {a.num_shares}: SecAgg+ shares with neighbours on both sides of a ring, so it "
        f"must be odd or equal to the clients sampled per round ({sampled})",
    )
    check(
        2 <= a.reconstruction_threshold < a.num_shares,
        "secure_aggregation.reconstruction_threshold",
        f"must be at least 2 and below secure_aggregation.num_shares ({a.num_shares}), "
        f"got {a.reconstruction_threshold}",
    )
    check(
        a.clipping_range > 0,
        "secure_aggregation.clipping_range",
        f"must be > 0, got {a.clipping_range}",
    )
    check(
        0 < a.quantization_range < 2**32,
        "secure_aggregation.quantization_range",
        f"must be in (0, 2**32), got {a.quantization_range}",
    )
    check(
        a.max_weight is None or a.max_weight > 0,
        "secure_aggregation.max_weight",
        f"must be > 0 or null, got {a.max_weight}",
    )
    check(
        cfg.strategy.name == "fedavg",
        "strategy.name",
        f"secure aggregation runs FedAvg (the server only sees a sum); got {cfg.strategy.name}",
    )
    check(
        cfg.strategy.batchnorm == "average",
        "strategy.batchnorm",
        "recompute sends each client's statistics in the clear, outside the secure sum; "
        "use strategy.batchnorm=average",
    )
    check(
        cfg.privacy.mode != "client_dp" or cfg.privacy.clipping == "client",
        "privacy.clipping",
        "must be 'client' with secure aggregation: the server cannot clip updates it cannot see",
    )
