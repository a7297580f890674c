"""Which nodes a round may sample, and a draw that depends on (seed, round, stage) alone."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Collection, Iterator, Mapping
from typing import Any, cast

from flwr.serverapp import Grid

from fl_lightning.config.schema import Config
from fl_lightning.seeding import derive


class CensusGrid:
    """A Grid that shows only the nodes bound in the census, in partition order.

    Flower's strategies sample from `get_node_ids()`: a node the census did not bind (it
    did not answer, or two nodes claimed its partition) is never sent a message, so it is
    neither counted as failed nor rejected. `allowed` narrows it to some partitions (those
    within the privacy budget).
    """

    def __init__(
        self, grid: Grid, nodes: Mapping[int, int], allowed: Collection[int] | None = None
    ) -> None:
        self._grid = grid
        self._nodes = nodes
        self._allowed = allowed

    def get_node_ids(self) -> list[int]:
        """Connected, bound (and allowed) node ids, sorted by partition id."""
        chosen = [
            node
            for node in self._grid.get_node_ids()
            if node in self._nodes and (self._allowed is None or self._nodes[node] in self._allowed)
        ]
        return sorted(chosen, key=lambda node: self._nodes[node])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@contextlib.contextmanager
def seeded_sampling(
    grid: Grid,
    nodes: Mapping[int, int],
    key: int,
    partial: bool,
    allowed: Collection[int] | None = None,
) -> Iterator[Grid]:
    """The census's view of `grid`, sampled reproducibly: Flower's draw seeded with `key`.

    Flower draws `random.sample` from Python's global RNG over node ids that are random
    per run; the same seed would sample other partitions in every run, and a resumed run
    others than the run it continues. With partial participation the nodes come in
    partition order and the draw is seeded with `key` (from seed, round, stage); the global
    RNG is restored afterwards.
    """
    view = cast(Grid, CensusGrid(grid, nodes, allowed))
    if not partial:
        yield view  # everybody takes part: nothing to reproduce
        return
    state = random.getstate()
    random.seed(key)  # an int from `seeding.derive`
    try:
        yield view
    finally:
        random.setstate(state)


def round_sampling(
    grid: Grid,
    cfg: Config,
    nodes: Mapping[int, int],
    server_round: int,
    stage: str,
    allowed: Collection[int] | None = None,
) -> contextlib.AbstractContextManager[Grid]:
    """The census's nodes (`allowed` ones only), sampled by (seed, round, stage) alone."""
    f = cfg.federation
    partial = not (f.fraction_train == 1.0 and f.fraction_evaluate in (0.0, 1.0))
    key = derive(cfg.seed, "sampling", stage, server_round)
    return seeded_sampling(grid, nodes, key, partial, allowed)
