"""`strategy.batchnorm=recompute`: BatchNorm statistics measured on each new global model.

The average of the clients' running statistics describes their models, not the averaged
one. So after each aggregation the clients that trained run the new model over some of
their training batches (a `query.batchnorm_statistics` message) and the server takes the
example-weighted mean of what they measured.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_lightning.config.schema import BATCHNORM_STATISTICS
from fl_lightning.server.reply_screen import BATCHNORM, weights
from fl_lightning.server.round_screen import RoundScreen
from fl_lightning.vocabulary import BATCHNORM_ACTION, SERVER_ROUND

BATCHNORM_MESSAGE_TYPE = f"{MessageType.QUERY}.{BATCHNORM_ACTION}"


def recompute_batchnorm(
    grid: Grid, arrays: ArrayRecord, replies: list[Message], server_round: int, screen: RoundScreen
) -> ArrayRecord:
    """`arrays` with the BatchNorm statistics the clients behind `replies` measure on them.

    Their replies are screened as updates are (failed or unusable ones counted and left
    out); when none is usable, or their mean is not finite, the averaged statistics stay,
    and the console says why. Timed as the round's `time/batchnorm_statistics`.
    """
    screen.recorder.lap("aggregation")
    nodes = [reply.metadata.src_node_id for reply in replies]
    updated, problem = _measured(grid, arrays, nodes, server_round, screen)
    if problem is not None:
        log(WARNING, "round %d: %s; the averaged ones stay", server_round, problem)
    screen.recorder.lap("batchnorm_statistics")
    return updated


def _measured(
    grid: Grid, arrays: ArrayRecord, nodes: list[int], server_round: int, screen: RoundScreen
) -> tuple[ArrayRecord, str | None]:
    """`arrays` with the statistics `nodes` measure on them, and what went wrong."""
    keys = [k for k in arrays if k.endswith(BATCHNORM_STATISTICS)]
    if not keys:
        return arrays, None
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({SERVER_ROUND: server_round})})
    messages = [
        Message(content, dst_node_id=node, message_type=BATCHNORM_MESSAGE_TYPE) for node in nodes
    ]
    timeout = screen.cfg.federation.round_timeout
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    reference = ArrayRecord({k: arrays[k] for k in keys})
    screened = screen.screen.screen(replies, BATCHNORM, reference=reference)
    missing = max(0, len(messages) - len(replies))
    screen.recorder.count(failures=screened.failures + missing, rejected=screened.rejected)
    valid = screen.norm_screened(screened.valid, reference, BATCHNORM)
    if not valid:
        return arrays, "no client measured BatchNorm statistics"
    shares = weights(valid)
    updated = ArrayRecord()
    for key, array in arrays.items():
        if key in keys:
            measured = [r.content.array_records["arrays"][key].numpy() for r in valid]
            mean = sum(w * m for w, m in zip(shares, measured, strict=True))
            array = Array(np.asarray(mean, dtype=array.numpy().dtype))
        updated[key] = array
    if not all(np.isfinite(updated[k].numpy()).all() for k in keys):
        return arrays, "the measured BatchNorm statistics are not finite"
    return updated, None
