"""`federation.stateful_clients`: a client's optimizer, scheduler and scaler state across rounds.

Each round builds a fresh module, optimizer and scheduler; with this on, `ClientState`
loads what the client's previous round left when fit starts, and saves what this round
leaves when it ends, so local training continues as one `Trainer.fit` paused for
aggregation (the weights still come from the server). The state stays on the client's
disk, `<output.dir>/client_state/<partition>/round_<r>.pt`: the server never receives
it, and a simulation of many clients holds only the ones training in memory. A round
loads the newest state of an earlier round, so a round redone after --resume starts
from what the uninterrupted run had: the client keeps the files of its last three
rounds, and the server lets at most one round's close wait in the background while
clients keep state (`RoundRecorder.close_in_background`), so --resume redoes at most
the last two.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from fl_lightning.errors import ClientError
from fl_lightning.files import write_atomically

_FILE = re.compile(r"round_(\d+)\.pt")


def client_state_dir(output_dir: str | None, partition_id: int) -> Path:
    """Where client `partition_id` keeps its state: `<output.dir>/client_state/<id>`."""
    if output_dir is None:
        raise ClientError(
            "federation.stateful_clients: output.dir is not set, so the client does not know "
            "where the run writes; set output.dir to an absolute path"
        )
    return Path(output_dir) / "client_state" / str(partition_id)


class ClientState(Callback):
    """Loads the client's optimizer, scheduler and scaler state as fit starts; saves it after.

    `kept` are the callbacks whose own state goes with it (SCAFFOLD's control variate,
    personal layers); no other callback's, whose counters a fresh Trainer restarts. With
    `optimizers` False only theirs is kept. `evaluating`: an evaluate message of round
    `server_round` (None: any), which reads the newest state up to it and saves nothing.
    """

    def __init__(
        self,
        folder: Path,
        server_round: int | None,
        kept: list[Callback],
        optimizers: bool = True,
        evaluating: bool = False,
    ) -> None:
        self.folder = folder
        self.server_round = server_round
        self.kept = {c.state_key: c for c in kept}
        self.optimizers = optimizers and not evaluating
        self.evaluating = evaluating
        self.loaded: int | None = None  # the round whose state this fit continues
        self._saved: dict[str, Any] | None = None

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = (_FILE.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m is not None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Read the newest state of an earlier round; give the kept callbacks theirs."""
        last, upto = self.server_round, self.evaluating
        earlier = [r for r in self._rounds() if last is None or r < last or (upto and r == last)]
        if not earlier:
            return
        self.loaded = earlier[-1]
        with self._continuing():
            self._saved = torch.load(self._path(self.loaded), map_location="cpu", weights_only=True)
            for key, callback in self.kept.items():
                state = self._saved["callbacks"].get(key)
                if state is not None:
                    callback.load_state_dict(state)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Continue the optimizers (set up by now; before DP-SGD wraps them)."""
        if self.optimizers and self._saved is not None:
            with self._continuing():
                _restore(trainer, self._saved)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save this round's state; keep the files of the two rounds before it."""
        if self.server_round is None or self.evaluating:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = _capture(trainer) if self.optimizers else {}
        state["callbacks"] = {key: c.state_dict() for key, c in self.kept.items()}
        write_atomically(self._path(self.server_round), lambda partial: torch.save(state, partial))
        older = [r for r in self._rounds() if r < self.server_round]  # a redone round's stay
        for old in older[:-2]:
            self._path(old).unlink(missing_ok=True)

    def _path(self, server_round: int) -> Path:
        return self.folder / f"round_{server_round}.pt"

    @contextlib.contextmanager
    def _continuing(self) -> Iterator[None]:
        """A state that cannot be continued, said in one line with what to do."""
        try:
            yield
        except (OSError, RuntimeError, ValueError, KeyError, IndexError) as err:
            path = self._path(self.loaded or 0)
            raise ClientError(
                f"federation.stateful_clients: cannot continue from {path} "
                f"({type(err).__name__}: {err}); was the module or its optimizers changed? "
                f"Remove {self.folder} to start this client afresh"
            ) from None


def _scaler(trainer: pl.Trainer) -> Any:
    """AMP's grad scaler (16-mixed precision on CUDA), if the Trainer has one."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _capture(trainer: pl.Trainer) -> dict[str, Any]:
    scaler = _scaler(trainer)
    return {
        "optimizers": [o.state_dict() for o in trainer.optimizers],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def _restore(trainer: pl.Trainer, saved: dict[str, Any]) -> None:
    optimizers, configs = trainer.optimizers, trainer.lr_scheduler_configs
    if len(saved["optimizers"]) != len(optimizers) or len(saved["schedulers"]) != len(configs):
        raise ValueError(
            f"saved {len(saved['optimizers'])} optimizers and {len(saved['schedulers'])} "
            f"schedulers, the module now has {len(optimizers)} and {len(configs)}"
        )
    for optimizer, state in zip(optimizers, saved["optimizers"], strict=True):
        optimizer.load_state_dict(state)
    for config, state in zip(configs, saved["schedulers"], strict=True):
        config.scheduler.load_state_dict(state)
    scaler = _scaler(trainer)
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
