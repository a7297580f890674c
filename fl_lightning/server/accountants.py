"""DP-SGD after --resume: each sampled client gets back the accountant the server kept.

The clients' accountants died with the killed run. The server keeps each one it verified
(`RoundScreen`) in resume.pt; a resumed run sends every sampled client its own (every
round: a client first sampled later needs it then), and nobody else's (a client's
accountant tells its sample rate).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fl_lightning.vocabulary import accountant_key


def with_own_accountants(
    messages: list[Message], nodes: Mapping[int, int], accountants: Mapping[int, str]
) -> list[Message]:
    """`messages` (train), each carrying its client's accountant where the server has one."""
    return [_with_accountant(m, nodes, accountants) for m in messages]


def _with_accountant(
    message: Message, nodes: Mapping[int, int], accountants: Mapping[int, str]
) -> Message:
    partition = nodes.get(message.metadata.dst_node_id)
    state = accountants.get(partition) if partition is not None else None
    if state is None:
        return message
    content = RecordDict(dict(message.content.items()))
    config = ConfigRecord(dict(message.content.config_records["config"]))
    config[accountant_key(partition)] = state  # type: ignore[arg-type]
    content["config"] = config
    return Message(
        content, dst_node_id=message.metadata.dst_node_id, message_type=MessageType.TRAIN
    )
