"""Flower ClientApp: decode the message, run Lightning training or validation, encode the reply."""

from __future__ import annotations

from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_lightning.config import Config, config_from_run_config


def _partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config (Simulation Engine or SuperNode)."""
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _identity(context: Context) -> ConfigRecord:
    """Which partition replied: lets the server aggregate replies in a fixed order."""
    return ConfigRecord({"partition-id": _partition(context)[0]})


def make_client_app(cfg: Config | None = None) -> ClientApp:
    """A ClientApp bound to `cfg`, or reading it from the run config when `cfg` is None."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fl_lightning import (
            training,
        )  # torch and Lightning load on first message, not at import

        config = cfg or config_from_run_config(context.run_config)
        round_config = msg.content.config_records["config"]
        result = training.fit(
            config,
            msg.content.array_records["arrays"].to_torch_state_dict(),
            *_partition(context),
            server_round=cast(int, round_config["server-round"]),
            lr=cast(float, round_config.get("lr", config.optimizer.lr)),
            proximal_mu=cast(float, round_config.get("proximal-mu", 0.0)),
        )
        assert result.state_dict is not None
        content = RecordDict(
            {
                "arrays": ArrayRecord(result.state_dict),
                "metrics": MetricRecord({**result.metrics, "num-examples": result.num_examples}),
                "client": _identity(context),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fl_lightning import training

        config = cfg or config_from_run_config(context.run_config)
        state_dict = msg.content.array_records["arrays"].to_torch_state_dict()
        result = training.validate(config, state_dict, *_partition(context))
        content = RecordDict(
            {
                "metrics": MetricRecord({**result.metrics, "num-examples": result.num_examples}),
                "client": _identity(context),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


# Entry point for `flwr run .` and SuperNodes ([tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
