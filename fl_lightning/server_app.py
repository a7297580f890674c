"""Flower ServerApp: a strategy over Lightning clients, with centralized evaluation and logging."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fl_lightning.config import Config
from fl_lightning.errors import NothingTrained, PrivacyBudgetExceeded
from fl_lightning.node_config import config_from_run_config
from fl_lightning.rundir import RunDir, create_run_dir

if TYPE_CHECKING:  # torch and Lightning load when the ServerApp runs, not at import
    import torch

    from fl_lightning.census import Census, Known
    from fl_lightning.resume import ResumeState
    from fl_lightning.rounds import RoundRecorder
    from fl_lightning.tracking import RunTracker


def run_federation(
    grid: Grid,
    cfg: Config,
    run: RunDir,
    context: Context | None = None,
    console: bool = True,
    resume: ResumeState | None = None,
) -> None:
    """Run `federation.num_rounds` rounds of the strategy and write the run directory.

    With `secure_aggregation.enabled`, the rounds run Flower's SecAgg+ workflow (legacy
    API, which needs the ServerApp's `context`). A run with `privacy.max_epsilon` ends
    early, cleanly, before a round that would exceed it: the last completed round's
    checkpoint is the run's model. With `resume`, the rounds continue after its round.
    """
    import lightning as L

    from fl_lightning.census import nothing_trained
    from fl_lightning.client_report import client_report
    from fl_lightning.evaluation import CentralEvaluator
    from fl_lightning.rounds import RoundRecorder
    from fl_lightning.tracking import RunTracker

    L.seed_everything(cfg.seed, verbose=False)  # the initial global model
    evaluator = CentralEvaluator(cfg)
    initial = ArrayRecord(evaluator.model.state_dict())
    fed = cfg.federation
    tracker = RunTracker(run, fed.num_rounds, cfg.to_dict(), console=console)
    start = initial
    if resume is not None:
        tracker.history.update(resume.history)
        tracker.progress.update(resume.round)
        start = ArrayRecord(resume.weights)
    census = _census(grid, cfg, tracker, _known(cfg))
    recorder = RoundRecorder(evaluator, tracker, run)
    if resume is not None:
        recorder.load_logged_names(resume.logged)  # a name's prefix depends on earlier rounds
    # DP-SGD plans every partition: one without a census answer (it takes no part) gets
    # the smallest reported size, whose epsilon per round is the largest (conservative).
    fill = min(census.train_sizes.values()) if cfg.privacy.mode == "dp_sgd" else 0
    partition_sizes = census.partition_sizes(fill)
    if cfg.privacy.mode != "none":
        import torch

        from fl_lightning.privacy_ledger import PrivacyLedger

        recorder.ledger = PrivacyLedger(cfg, partition_sizes)
        if any(isinstance(m, torch.nn.GroupNorm) for m in evaluator.model.modules()):
            tracker.note("privacy: BatchNorm replaced by GroupNorm (Opacus ModuleValidator.fix)")
        if cfg.privacy.reproducible_noise:
            from fl_lightning.dp_randomness import REPRODUCIBLE_WARNING

            tracker.note(f"privacy: {REPRODUCIBLE_WARNING}")
        if resume is not None and resume.ledger is not None:
            recorder.ledger.load_state(resume.ledger)
            if not cfg.privacy.reproducible_noise:
                recorder.ledger.charge_interrupted_round()
    if resume is not None and resume.rng is not None:
        from fl_lightning.resume import restore_rng

        restore_rng(resume.rng)  # last: everything above may draw from the global RNGs
    try:
        if cfg.secure_aggregation.enabled:
            from fl_lightning.secure_aggregation import run_secure_rounds

            assert context is not None, "SecAgg+ runs in a ServerApp (it needs its Context)"
            final = run_secure_rounds(
                grid, context, cfg, recorder, initial, partition_sizes, census.nodes
            )
        else:
            final = _run_rounds(grid, cfg, recorder, start, census, resume)
        recorder.wait()  # rounds closed in the background; the report reuses the evaluator
        if _unchanged(final, initial):
            # Every round skipped (or refused): the "trained" model is the initial one.
            message = nothing_trained("no round of the run adopted an update", census.notices)
            tracker.note(message)
            raise NothingTrained(message)
        if cfg.output.client_report:
            tracker.log_clients(client_report(cfg, evaluator, initial.to_torch_state_dict(), final))
    except PrivacyBudgetExceeded as stop:
        tracker.note(f"privacy budget: {stop}")
        run.stopped.write_text(f"{stop}\n")
    finally:
        try:
            recorder.shutdown()  # whatever ended the run, the rounds it completed are written
        finally:
            tracker.close()


def _run_rounds(
    grid: Grid,
    cfg: Config,
    recorder: RoundRecorder,
    initial: ArrayRecord,
    census: Census,
    resume: ResumeState | None = None,
) -> dict[str, torch.Tensor]:
    """The Message-API strategy's rounds (those after `resume`'s); the final global weights."""
    from fl_lightning.strategy import build_strategy

    fed = cfg.federation
    from fl_lightning.client_data import has_validation

    # No federated evaluation without local validation samples.
    fraction_evaluate = fed.fraction_evaluate if has_validation(cfg) else 0.0
    strategy = build_strategy(
        cfg,
        recorder,
        census,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
    )
    recorder.strategy = strategy
    recorder.screen = strategy.screen
    done = 0
    if resume is not None:
        done = strategy.round_offset = resume.round
        from fl_lightning.resume import load_strategy_state

        load_strategy_state(strategy, resume, cfg)  # each attribute rebuilt with its own type
        if resume.screened is not None:
            strategy.screen.load_state(resume.screened)  # the names the run's replies agreed on
        strategy.resent_accountants = bool(strategy.accountants)
    runner: Strategy = strategy
    if cfg.privacy.mode == "client_dp":
        from fl_lightning.client_dp import wrap_strategy

        assert recorder.ledger is not None
        runner = wrap_strategy(strategy, cfg, recorder.ledger)
    result = runner.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=fed.num_rounds - done,
        timeout=fed.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=strategy.evaluate,
    )
    # Flower's Result holds no arrays when no round adopted an aggregate: the model stayed.
    return (result.arrays if len(result.arrays) else initial).to_torch_state_dict()


def _known(cfg: Config) -> Known:
    """What the server knows of the clients' data: a built-in dataset's class names and
    each partition's sizes, from the split every client makes of the same public copy.

    The built-in datasets are decoded on the server anyway (their test split; the CLI has
    made the split already to check it); a `data.class_path` DataModule's training data is
    never opened here: nothing known. A site's own data (node config `data-root`) is not
    the server's copy: clients say so in the census, and their sizes are not checked.
    """
    from fl_lightning.census import Known

    if cfg.data.class_path is not None:
        return Known()
    from fl_lightning.data import load_splits
    from fl_lightning.partition import client_splits

    splits = client_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    sizes = tuple((len(train), len(val)) for train, val in splits)
    return Known(load_splits(cfg.data).classes, sizes)


def _census(grid: Grid, cfg: Config, tracker: RunTracker, known: Known) -> Census:
    """Ask every client what it holds (`fl_lightning.census`); draw the label histogram
    from the counts clients sent, or say why there is none."""
    from fl_lightning.census import take_census

    try:
        census = take_census(grid, cfg, known)
    except NothingTrained as err:
        tracker.note(str(err))
        tracker.close()
        raise
    for conflict in census.conflicts:
        tracker.note(f"census conflict: {conflict}")
    if census.missing():
        tracker.note(f"census: no client answered for partitions {census.missing()}")
    if census.label_counts:
        import numpy as np

        rows = census.label_count_rows(len(known.classes))
        tracker.log_label_histogram(np.array(rows), known.classes)
    elif cfg.data.class_path is not None:
        tracker.note(
            "label histogram: not drawn; clients of a data.class_path DataModule "
            "send only their partition sizes"
        )
    else:
        tracker.note(
            "label histogram: not drawn; under differential privacy or secure aggregation "
            "clients send only their partition sizes, not their label counts"
        )
    return census


def _unchanged(final: dict[str, torch.Tensor], initial: ArrayRecord) -> bool:
    """Whether the run's final weights are exactly its initial model's."""
    import torch

    start = initial.to_torch_state_dict()
    return final.keys() == start.keys() and all(torch.equal(final[k], start[k]) for k in start)


def make_server_app(
    cfg: Config | None = None,
    run: RunDir | None = None,
    console: bool = True,
    resume: ResumeState | None = None,
) -> ServerApp:
    """A ServerApp bound to `cfg` and `run`, or reading the config from the run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None and not context.run_config.get("verbose", False):
            # As `fl-lightning run` without --verbose: our one line per round, not Flower's.
            logging.getLogger("flwr").setLevel(logging.WARNING)
        config = cfg or config_from_run_config(context.run_config)
        run_federation(
            grid, config, run or create_run_dir(config), context, console=console, resume=resume
        )

    return app


# Entry point for `flwr run .` ([tool.flwr.app.components] in pyproject.toml).
app = make_server_app()
