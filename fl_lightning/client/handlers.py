"""What a ClientApp does with each message: decode it, run the Lightning code, encode the reply.

One function per message type (`client_app.py` registers them), each a thin adapter
around `fl_lightning.client.training`. Every reply names its partition in the identity
record, so the server can screen it against the census and aggregate in a fixed order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from fl_lightning.client import training

if TYPE_CHECKING:
    import torch
from fl_lightning.config.schema import Config, sends_label_counts
from fl_lightning.vocabulary import (
    ACCOUNTANT_RECORD,
    CENSUS_RECORD,
    IDENTITY_RECORD,
    LABEL_COUNTS,
    LR_FACTOR,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    OWN_DATA,
    PARTITION_ID,
    PROXIMAL_MU,
    SCAFFOLD_RECORD,
    SERVER_ROUND,
    TRAIN_SIZE,
    UNIFORM_WEIGHT,
    VAL_SIZE,
    accountant_key,
)


def partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config (Simulation Engine or SuperNode)."""
    node = context.node_config
    return int(node[PARTITION_ID]), int(node[NUM_PARTITIONS])


def train(cfg: Config, msg: Message, context: Context) -> Message:
    """`Trainer.fit` on this client's partition from the global weights; reply with the new ones."""
    round_config = msg.content.config_records["config"]
    result = training.fit(
        cfg,
        msg.content.array_records["arrays"].to_torch_state_dict(),
        *partition(context),
        server_round=cast(int, round_config[SERVER_ROUND]),
        lr_factor=cast(float, round_config.get(LR_FACTOR, 1.0)),
        proximal_mu=cast(float, round_config.get(PROXIMAL_MU, 0.0)),
        accountant_state=_accountant(context, round_config),
        control=_control(msg),
    )
    reply = _reply(msg, context, result)
    if result.control_delta is not None:
        reply.content[SCAFFOLD_RECORD] = ArrayRecord(result.control_delta)
    if result.accountant_state is not None:
        record = ConfigRecord({"state": result.accountant_state})
        context.state[ACCOUNTANT_RECORD] = record
        reply.content[ACCOUNTANT_RECORD] = record  # the server keeps it for --resume
    return reply


def _control(msg: Message) -> dict[str, torch.Tensor] | None:
    """SCAFFOLD: the server's control variate the train message carries, if any."""
    record = msg.content.array_records.get(SCAFFOLD_RECORD)
    return record.to_torch_state_dict() if record is not None else None


def _accountant(context: Context, round_config: ConfigRecord) -> str | None:
    """DP-SGD: this client's accountant, kept in its state or, after --resume (which lost
    the killed run's clients), resent by the server."""
    kept = context.state.config_records.get(ACCOUNTANT_RECORD)
    if kept:
        return cast(str, kept["state"])
    return cast(str | None, round_config.get(accountant_key(partition(context)[0])))


def evaluate(cfg: Config, msg: Message, context: Context) -> Message:
    """Validate the global model on this client's held-out samples."""
    state_dict = msg.content.array_records["arrays"].to_torch_state_dict()
    round_config = msg.content.config_records.get("config")
    server_round = round_config.get(SERVER_ROUND) if round_config is not None else None
    result = training.validate(cfg, state_dict, *partition(context), cast(int | None, server_round))
    return _reply(msg, context, result)


def batchnorm_statistics(cfg: Config, msg: Message, context: Context) -> Message:
    """BatchNorm statistics of the global model on this client's data (strategy.batchnorm)."""
    round_config = msg.content.config_records["config"]
    result = training.batchnorm_statistics(
        cfg,
        msg.content.array_records["arrays"].to_torch_state_dict(),
        *partition(context),
        server_round=cast(int, round_config[SERVER_ROUND]),
    )
    return _reply(msg, context, result)


def census(cfg: Config, msg: Message, context: Context) -> Message:
    """This node's partition and its sizes (and label counts when no privacy is on)."""
    train_size, val_size, labels = training.census(
        cfg, *partition(context), with_labels=sends_label_counts(cfg)
    )
    own = cfg.data.partition == "site"
    record = ConfigRecord({TRAIN_SIZE: train_size, VAL_SIZE: val_size, OWN_DATA: own})
    if labels is not None:
        record[LABEL_COUNTS] = labels
    content = RecordDict({IDENTITY_RECORD: _identity(context), CENSUS_RECORD: record})
    return Message(content=content, reply_to=msg)


def _reply(msg: Message, context: Context, result: training.ClientResult) -> Message:
    """The reply to `msg`: the result's weights (if any), its metrics, and who replied."""
    metrics: dict[str, MetricRecordValues] = {
        **result.metrics,
        **result.seconds,
        NUM_EXAMPLES: result.num_examples,
        UNIFORM_WEIGHT: 1,
    }
    content = RecordDict()
    if result.state_dict is not None:
        content["arrays"] = ArrayRecord(result.state_dict)
    content["metrics"] = MetricRecord(metrics)
    content[IDENTITY_RECORD] = _identity(context)
    return Message(content=content, reply_to=msg)


def _identity(context: Context) -> ConfigRecord:
    """Which partition replied: lets the server aggregate replies in a fixed order."""
    return ConfigRecord({PARTITION_ID: partition(context)[0]})
