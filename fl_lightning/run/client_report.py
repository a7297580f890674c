"""Per-client report: a model trained on the client's data alone vs the federated model.

The clean-vs-noisy clients experiment: "before FL" trains the initial model on one
client's partition alone, for the same number of local epochs the federation ran
(num_rounds x trainer.max_epochs); "after FL" is the final global model (with the
client's own personal layers, `strategy.local_parameters`). Both are tested
on the client's kind of test data: the clean test split, or the test split with
`data.noise` applied for a noisy client. It trains on every client's data, so it runs in
the simulation's driver, after the federation, never in the ServerApp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fl_lightning.client import training
from fl_lightning.config.schema import Config
from fl_lightning.server.evaluation import CentralEvaluator
from fl_lightning.server.rundir import RunDir
from fl_lightning.server.tracking import add_client_report


def write_client_report(cfg: Config, run: RunDir) -> None:
    """`output.client_report` of a finished run: its rows added to the run directory."""
    evaluator = CentralEvaluator(cfg)  # the server's initial model, drawn again
    initial = {k: v.detach().clone() for k, v in evaluator.model.state_dict().items()}
    checkpoint = torch.load(run.checkpoint("last"), map_location="cpu", weights_only=True)
    final = checkpoint["state_dict"]
    add_client_report(run, client_report(cfg, evaluator, initial, final, run.path))


def personal_state(cfg: Config, run_dir: Path, client: int) -> dict[str, torch.Tensor]:
    """The personal layers (`strategy.local_parameters`) client `client` ended the run with;
    {} without them or if it never trained."""
    if not cfg.strategy.local_parameters:
        return {}
    from fl_lightning.client.state import client_state_dir

    folder = client_state_dir(str(run_dir), client)
    files = sorted(folder.glob("round_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        return {}
    saved = torch.load(files[-1], map_location="cpu", weights_only=True)
    return dict(saved["callbacks"].get("PersonalLayers", {}).get("own", {}))


def client_report(
    cfg: Config,
    evaluator: CentralEvaluator,
    initial_state: dict[str, torch.Tensor],
    final_state: dict[str, torch.Tensor],
    run_dir: Path,
) -> list[dict[str, Any]]:
    """One row per client: `client`, `noisy`, `before_fl_accuracy`, `after_fl_accuracy`."""
    num_clients = cfg.federation.num_clients
    budget = cfg.federation.num_rounds * cfg.trainer.max_epochs
    after = {
        noisy: evaluator.evaluate(final_state, noisy=noisy)["test/accuracy"]
        for noisy in (False, True)
    }
    rows = []
    for client in range(num_clients):
        noisy = client in cfg.data.noise.clients
        own = personal_state(cfg, run_dir, client)
        # strategy.local_parameters: the global model with the client's own layers.
        mine = evaluator.evaluate({**final_state, **own}, noisy=noisy) if own else None
        alone = training.fit(
            cfg, initial_state, client, num_clients, server_round=0, max_epochs=budget
        )
        assert alone.state_dict is not None
        before = evaluator.evaluate(alone.state_dict, noisy=noisy)["test/accuracy"]
        rows.append(
            {
                "client": client,
                "noisy": noisy,
                "before_fl_accuracy": before,
                "after_fl_accuracy": mine["test/accuracy"] if mine else after[noisy],
            }
        )
    return rows
