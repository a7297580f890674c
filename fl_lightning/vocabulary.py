"""The words client and server share: message actions, record and metric names, round keys.

The ClientApp and the ServerApp (strategy, reply screen, census) each import this module
and never each other, so either side can change without the other's code in its process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fl_lightning.config import Config

# Query actions (message type "query.<action>"): the census at the start of a run
# (fl_lightning.census), and strategy.batchnorm=recompute's statistics.
CENSUS_ACTION = "census"
BATCHNORM_ACTION = "batchnorm_statistics"

# Records. Every reply names its partition in IDENTITY_RECORD; the census reply carries
# CENSUS_RECORD; a DP-SGD client keeps its privacy accountant in ACCOUNTANT_RECORD (its
# Context.state, and its train replies, so the server can keep it for --resume).
IDENTITY_RECORD = "client"
CENSUS_RECORD = "census"
ACCOUNTANT_RECORD = "dp-sgd-accountant"

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
RESERVED_METRICS = (NUM_EXAMPLES, UNIFORM_WEIGHT, EPSILON_METRIC)
# A reply carries at most this many of the module's metrics, each name this long at most.
MAX_METRICS = 64
MAX_METRIC_NAME = 128

# Keys of the "config" record the server sends with each round's messages.
SERVER_ROUND = "server-round"
LR_FACTOR = "lr-factor"  # multiplies the module's learning rates (optimizer.round_decay)
PROXIMAL_MU = "proximal-mu"  # FedProx


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
