"""Flower ServerApp: FedAvg over Lightning clients, with centralized evaluation and run logging."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_lightning.config import Config, config_from_run_config
from fl_lightning.rundir import RunDir, create_run_dir


def run_federation(grid: Grid, cfg: Config, run: RunDir, console: bool = True) -> None:
    """Run `federation.num_rounds` rounds of FedAvg and write the run directory."""
    import lightning as L

    from fl_lightning.client_report import client_report
    from fl_lightning.datamodule import label_counts
    from fl_lightning.evaluation import CentralEvaluator
    from fl_lightning.strategy import build_strategy
    from fl_lightning.tracking import RunTracker

    L.seed_everything(cfg.seed, verbose=False)  # the initial global model
    evaluator = CentralEvaluator(cfg)
    initial = ArrayRecord(evaluator.model.state_dict())
    fed = cfg.federation
    tracker = RunTracker(run, fed.num_rounds, cfg.to_dict(), console=console)
    # No federated evaluation without local validation samples.
    fraction_evaluate = fed.fraction_evaluate if cfg.data.val_fraction > 0 else 0.0
    strategy = build_strategy(
        cfg,
        evaluator,
        tracker,
        run,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=fed.num_clients,
    )
    counts = label_counts(cfg.data, fed.num_clients, cfg.seed)
    tracker.log_label_histogram(counts.numpy(), evaluator.datamodule.splits.classes)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=fed.num_rounds,
            timeout=fed.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            evaluate_fn=strategy.evaluate,
        )
        if cfg.output.client_report:
            final = result.arrays.to_torch_state_dict()
            tracker.log_clients(client_report(cfg, evaluator, initial.to_torch_state_dict(), final))
    finally:
        tracker.close()


def make_server_app(
    cfg: Config | None = None, run: RunDir | None = None, console: bool = True
) -> ServerApp:
    """A ServerApp bound to `cfg` and `run`, or reading the config from the run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg or config_from_run_config(context.run_config)
        run_federation(grid, config, run or create_run_dir(config), console=console)

    return app


# Entry point for `flwr run .` ([tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
