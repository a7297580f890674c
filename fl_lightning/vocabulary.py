"""The words client and server share: message actions, record and metric names, round keys.

The ClientApp and the ServerApp (strategy, reply screen, census) each import this module
and never each other, so either side can change without the other's code in its process.
"""

from __future__ import annotations

# Query actions (message type "query.<action>"): the census at the start of a run
# (fl_lightning.server.census), and strategy.batchnorm=recompute's statistics.
CENSUS_ACTION = "census"
BATCHNORM_ACTION = "batchnorm_statistics"

# Records. Every reply names its partition in IDENTITY_RECORD; the census reply carries
# CENSUS_RECORD; a DP-SGD client keeps its privacy accountant in ACCOUNTANT_RECORD (its
# Context.state, and its train replies, so the server can keep it for --resume).
IDENTITY_RECORD = "client"
CENSUS_RECORD = "census"
ACCOUNTANT_RECORD = "dp-sgd-accountant"
# SCAFFOLD's control variates: the server's in a train message, a client's change in its reply.
SCAFFOLD_RECORD = "scaffold-control"

# The census record's keys: a client's training and validation sizes, whether its data is
# its own (a site's `data-root`: nothing the server can check it against), and, only
# without privacy, its training-label counts.
TRAIN_SIZE = "train-size"
VAL_SIZE = "val-size"
OWN_DATA = "own-data"
LABEL_COUNTS = "label-counts"

# Metrics a reply carries besides the module's own. NUM_EXAMPLES weighs FedAvg;
# UNIFORM_WEIGHT (always 1) weighs client_dp's unweighted mean of clipped updates;
# EPSILON_METRIC is a DP-SGD client's cumulative epsilon.
NUM_EXAMPLES = "num-examples"
UNIFORM_WEIGHT = "uniform-weight"
EPSILON_METRIC = "privacy/epsilon"
# A train reply may say where its time went: seconds from the message to `Trainer.fit`
# (data, model, Trainer) and in `fit`; the round logs their means as
# `time/clients/setup` and `time/clients/fit`.
SETUP_SECONDS = "setup-seconds"
FIT_SECONDS = "fit-seconds"
CLIENT_SECONDS = (SETUP_SECONDS, FIT_SECONDS)
RESERVED_METRICS = (NUM_EXAMPLES, UNIFORM_WEIGHT, EPSILON_METRIC, *CLIENT_SECONDS)
# A reply carries at most this many of the module's metrics, each name this long at most.
MAX_METRICS = 64
MAX_METRIC_NAME = 128

# Keys of the "config" record the server sends with each round's messages.
SERVER_ROUND = "server-round"
LR_FACTOR = "lr-factor"  # multiplies the module's learning rates (optimizer.round_decay)
PROXIMAL_MU = "proximal-mu"  # FedProx

# Node config keys Flower's Simulation Engine sets (and a SuperNode's --node-config names):
# which partition a node trains on, out of how many. The identity record repeats the first.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


def accountant_key(partition: int) -> str:
    """The config-record key under which a resumed run resends a client its accountant."""
    return f"accountant-{partition}"


# SecAgg+ (Flower's legacy API): the fit config's bound on a client's weight, and the fit
# metric counting coordinates SecAgg+ would clip (should stay 0: raise clipping_range).
MAX_WEIGHT = "max-weight"
CLIPPED_METRIC = "secure_aggregation/clipped"


def legacy_loss(metrics: dict[str, float]) -> float:
    """The loss Flower's legacy API wants with an evaluation: the first logged `*loss*`."""
    return next((float(v) for k, v in metrics.items() if "loss" in k), 0.0)
