"""Flower ClientApp: decode the message, run Lightning training or validation, encode the reply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fl_lightning.config import Config
from fl_lightning.node_config import apply_node_config, config_from_run_config
from fl_lightning.vocabulary import (
    ACCOUNTANT_RECORD,
    BATCHNORM_ACTION,
    CENSUS_ACTION,
    CENSUS_RECORD,
    IDENTITY_RECORD,
    LABEL_COUNTS,
    LR_FACTOR,
    NUM_EXAMPLES,
    OWN_DATA,
    PROXIMAL_MU,
    SERVER_ROUND,
    TRAIN_SIZE,
    UNIFORM_WEIGHT,
    VAL_SIZE,
    sends_label_counts,
)


def _partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config (Simulation Engine or SuperNode)."""
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _node_config(cfg: Config | None, context: Context) -> Config:
    """The run's config (bound, or named by the run config) as this SuperNode runs it."""
    return apply_node_config(cfg or config_from_run_config(context.run_config), context.node_config)


def _identity(context: Context) -> ConfigRecord:
    """Which partition replied: lets the server aggregate replies in a fixed order."""
    return ConfigRecord({"partition-id": _partition(context)[0]})


def _clipping_mod(cfg: Config | None) -> Mod:
    """Flower's `fixedclipping_mod` when the run's config has clients clip, else a pass-through."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = cfg or config_from_run_config(context.run_config)
        p = config.privacy
        # Under secure aggregation the legacy client clips its own delta (secure_aggregation).
        if (
            p.mode == "client_dp"
            and p.clipping == "client"
            and not config.secure_aggregation.enabled
        ):
            from flwr.clientapp.mod import fixedclipping_mod

            return fixedclipping_mod(msg, context, call_next)
        return call_next(msg, context)

    return mod


def make_client_app(
    cfg: Config | None = None, secure_mods: Sequence[Mod] = (), mods: Sequence[Mod] = ()
) -> ClientApp:
    """A ClientApp bound to `cfg`, or reading it from the run config when `cfg` is None.

    `mods` wrap every message (tests inject client faults with them).

    Runs with `secure_aggregation.enabled` speak Flower's legacy API (SecAgg+ exists only
    there): their messages go to the legacy ClientApp of `secure_aggregation`, which calls
    the same Lightning training. `secure_mods` run before its `secaggplus_mod` (tests use
    them to make a client drop out mid-protocol).
    """
    app = ClientApp(mods=list(mods))
    secure_app: ClientApp | None = None

    def secure() -> ClientApp:
        nonlocal secure_app
        if secure_app is None:
            from fl_lightning.secure_aggregation import make_secure_client_app

            secure_app = make_secure_client_app(cfg, secure_mods)
        return secure_app

    @app.train(mods=[_clipping_mod(cfg)])
    def train(msg: Message, context: Context) -> Message:
        config = _node_config(cfg, context)
        if config.secure_aggregation.enabled:
            return secure()(msg, context)
        # torch and Lightning load on the first message, not when the app is imported.
        from fl_lightning import training

        round_config = msg.content.config_records["config"]
        accountant = context.state.config_records.get(ACCOUNTANT_RECORD)
        partition = _partition(context)[0]
        # After --resume the server resends the accountants the killed run's clients held.
        resent = round_config.get(f"accountant-{partition}")
        accountant_state = cast(str, accountant["state"]) if accountant else resent
        result = training.fit(
            config,
            msg.content.array_records["arrays"].to_torch_state_dict(),
            *_partition(context),
            server_round=cast(int, round_config[SERVER_ROUND]),
            lr_factor=cast(float, round_config.get(LR_FACTOR, 1.0)),
            proximal_mu=cast(float, round_config.get(PROXIMAL_MU, 0.0)),
            accountant_state=cast(str | None, accountant_state),
        )
        assert result.state_dict is not None
        content = RecordDict(
            {
                "arrays": ArrayRecord(result.state_dict),
                "metrics": _metrics(result.metrics, result.num_examples),
                IDENTITY_RECORD: _identity(context),
            }
        )
        if result.accountant_state is not None:
            record = ConfigRecord({"state": result.accountant_state})
            context.state[ACCOUNTANT_RECORD] = record
            content[ACCOUNTANT_RECORD] = record  # the server keeps it for --resume
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fl_lightning import training

        config = _node_config(cfg, context)
        if config.secure_aggregation.enabled:
            return secure()(msg, context)
        state_dict = msg.content.array_records["arrays"].to_torch_state_dict()
        result = training.validate(config, state_dict, *_partition(context))
        content = RecordDict(
            {
                "metrics": _metrics(result.metrics, result.num_examples),
                IDENTITY_RECORD: _identity(context),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.query(BATCHNORM_ACTION)
    def batchnorm_statistics(msg: Message, context: Context) -> Message:
        """BatchNorm statistics of the global model on this client's data (strategy.batchnorm)."""
        from fl_lightning import training

        config = _node_config(cfg, context)
        round_config = msg.content.config_records["config"]
        result = training.batchnorm_statistics(
            config,
            msg.content.array_records["arrays"].to_torch_state_dict(),
            *_partition(context),
            server_round=cast(int, round_config[SERVER_ROUND]),
        )
        assert result.state_dict is not None
        content = RecordDict(
            {
                "arrays": ArrayRecord(result.state_dict),
                "metrics": _metrics(result.metrics, result.num_examples),
                IDENTITY_RECORD: _identity(context),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.query(CENSUS_ACTION)
    def census(msg: Message, context: Context) -> Message:
        """This node's partition and its sizes (and label counts when no privacy is on)."""
        from fl_lightning.training import census as client_census

        config = _node_config(cfg, context)
        partition, num_partitions = _partition(context)
        train, val, labels = client_census(
            config, partition, num_partitions, with_labels=sends_label_counts(config)
        )
        own = config.data.partition == "site"
        record = ConfigRecord({TRAIN_SIZE: train, VAL_SIZE: val, OWN_DATA: own})
        if labels is not None:
            record[LABEL_COUNTS] = labels
        content = RecordDict({IDENTITY_RECORD: _identity(context), CENSUS_RECORD: record})
        return Message(content=content, reply_to=msg)

    return app


def _metrics(metrics: dict[str, float], num_examples: int) -> MetricRecord:
    return MetricRecord({**metrics, NUM_EXAMPLES: num_examples, UNIFORM_WEIGHT: 1})


# Entry point for `flwr run .` and SuperNodes ([tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
