"""The ServerApp's run: census, privacy ledger, the rounds (Message API or SecAgg+), the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from fl_lightning.config.loggers import build_loggers
from fl_lightning.config.schema import Config
from fl_lightning.data.loaders import has_validation
from fl_lightning.errors import EarlyStopped, NothingTrained, PrivacyBudgetExceeded
from fl_lightning.models.state_dict import personal_keys
from fl_lightning.server.census import Census, Known, nothing_trained, take_census
from fl_lightning.server.continued_rounds import ContinuedRounds
from fl_lightning.server.evaluation import CentralEvaluator
from fl_lightning.server.resume_state import ResumeState, restore_rng
from fl_lightning.server.round_close import RoundRecorder
from fl_lightning.server.rundir import RunDir
from fl_lightning.server.strategy import build_strategy
from fl_lightning.server.tracking import RunTracker

if TYPE_CHECKING:  # opacus loads only for runs with differential privacy
    from fl_lightning.privacy.ledger import PrivacyLedger


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
    evaluator = CentralEvaluator(cfg)  # it draws the initial global model from the seed
    initial = ArrayRecord(evaluator.model.state_dict())
    loggers = build_loggers(cfg.output.loggers, run.path)
    tracker = RunTracker(
        run, cfg.federation.num_rounds, cfg.to_dict(), console=console, loggers=loggers
    )
    if resume is not None:
        tracker.history.update(resume.history)
        tracker.progress.update(resume.round)
    if cfg.strategy.local_parameters:
        personal = personal_keys(evaluator.model.state_dict(), cfg.strategy.local_parameters)
        tracker.note(
            f"strategy.local_parameters: {len(personal)} entries stay on the clients "
            f"({', '.join(personal[:3])}{', ...' if len(personal) > 3 else ''}); the server "
            "tests the global model with their initial values"
        )
    census = _census(grid, cfg, tracker, _known(cfg))
    ledger = _privacy_ledger(cfg, census, evaluator, tracker, resume)
    recorder = RoundRecorder(evaluator, tracker, run, ledger)
    if resume is not None:
        recorder.load_logged_names(resume.logged)  # a name's prefix depends on earlier rounds
        recorder.watch.replay(resume.history, run)
        if resume.rng is not None:
            restore_rng(resume.rng)  # last: everything above may draw from the global RNGs
    try:
        final = _rounds(grid, context, cfg, recorder, initial, census, resume)
        recorder.wait()  # rounds closed in the background
        if _unchanged(final, initial):
            # Every round skipped (or refused): the "trained" model is the initial one.
            message = nothing_trained("no round of the run adopted an update", census.notices)
            tracker.note(message)
            raise NothingTrained(message)
    except PrivacyBudgetExceeded as stop:
        tracker.note(f"privacy budget: {stop}")
        run.stopped.write_text(f"{stop}\n")
    except EarlyStopped as stop:
        tracker.note(str(stop))
        run.stopped.write_text(f"{stop}\n")
    finally:
        try:
            recorder.shutdown()  # whatever ended the run, the rounds it completed are written
        finally:
            tracker.close()


def _rounds(
    grid: Grid,
    context: Context | None,
    cfg: Config,
    recorder: RoundRecorder,
    initial: ArrayRecord,
    census: Census,
    resume: ResumeState | None,
) -> dict[str, torch.Tensor]:
    """The run's rounds, through SecAgg+ or the Message-API strategy; the final weights."""
    if not cfg.secure_aggregation.enabled:
        return _run_rounds(grid, cfg, recorder, initial, census, resume)
    from fl_lightning.server.secure import run_secure_rounds

    assert context is not None, "SecAgg+ runs in a ServerApp (it needs its Context)"
    sizes = census.partition_sizes()
    fraction = evaluation_fraction(cfg, recorder.evaluator.model)
    return run_secure_rounds(grid, context, cfg, recorder, initial, sizes, census.nodes, fraction)


def evaluation_fraction(cfg: Config, model: torch.nn.Module) -> float:
    """`federation.fraction_evaluate`, or 0 where clients hold no validation data or the
    module has no `validation_step` (every path: the Message-API strategies and SecAgg+)."""
    if not has_validation(cfg) or not is_overridden("validation_step", model):
        return 0.0
    return cfg.federation.fraction_evaluate


def _privacy_ledger(
    cfg: Config,
    census: Census,
    evaluator: CentralEvaluator,
    tracker: RunTracker,
    resume: ResumeState | None,
) -> PrivacyLedger | None:
    """The run's privacy ledger (None without privacy), continued from `resume`'s."""
    if cfg.privacy.mode == "none":
        return None
    from fl_lightning.privacy.ledger import PrivacyLedger
    from fl_lightning.privacy.randomness import REPRODUCIBLE_WARNING

    # DP-SGD plans every partition: one without a census answer (it takes no part) gets
    # the smallest reported size, whose epsilon per round is the largest (conservative).
    fill = min(census.train_sizes.values()) if cfg.privacy.mode == "dp_sgd" else 0
    ledger = PrivacyLedger(cfg, census.partition_sizes(fill))
    if any(isinstance(m, torch.nn.GroupNorm) for m in evaluator.model.modules()):
        tracker.note("privacy: BatchNorm replaced by GroupNorm (Opacus ModuleValidator.fix)")
    if cfg.privacy.reproducible_noise:
        tracker.note(f"privacy: {REPRODUCIBLE_WARNING}")
    if resume is not None and resume.ledger is not None:
        ledger.load_state(resume.ledger)
        if not cfg.privacy.reproducible_noise:
            ledger.charge_interrupted_round()
    return ledger


def _run_rounds(
    grid: Grid,
    cfg: Config,
    recorder: RoundRecorder,
    initial: ArrayRecord,
    census: Census,
    resume: ResumeState | None = None,
) -> dict[str, torch.Tensor]:
    """The Message-API strategy's rounds (those after `resume`'s); the final global weights."""
    strategy = build_strategy(
        cfg,
        recorder,
        census,
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=evaluation_fraction(cfg, recorder.evaluator.model),
        min_train_nodes=1,
        min_evaluate_nodes=1,
    )
    runner: Strategy = strategy
    if cfg.privacy.mode == "client_dp":
        from fl_lightning.server.dp_fedavg import wrap_strategy

        assert recorder.ledger is not None
        runner = wrap_strategy(strategy, cfg, recorder.ledger)
    done, start, evaluate = 0, initial, strategy.evaluate
    if resume is not None:
        done, start = resume.round, ArrayRecord(resume.weights)
        strategy.load_state_dict(resume.strategy, resume.weights)
        if resume.screened is not None:
            strategy.screen.load_state(resume.screened)  # the names the run's replies agreed on
        runner = continued = ContinuedRounds(runner, done, strategy.evaluate)
        evaluate = continued.evaluate
    result = runner.start(
        grid=grid,
        initial_arrays=start,
        num_rounds=cfg.federation.num_rounds - done,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate,
    )
    # Flower's Result holds no arrays when no round adopted an aggregate: the model stayed.
    return (result.arrays if len(result.arrays) else start).to_torch_state_dict()


def _known(cfg: Config) -> Known:
    """What the server knows of the clients' data: a built-in dataset's class names and
    each partition's sizes, from the split every client makes of the same public copy.

    The built-in datasets are decoded on the server anyway (their test split; the CLI has
    made the split already to check it); a `data.class_path` DataModule's training data is
    never opened here: nothing known. A site's own data (node config `data-root`) is not
    the server's copy: clients say so in the census, and their sizes are not checked.
    """
    if cfg.data.class_path is not None:
        return Known()
    from fl_lightning.data.datasets import load_splits
    from fl_lightning.data.partition import client_splits

    splits = client_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    sizes = tuple((len(train), len(val)) for train, val in splits)
    return Known(load_splits(cfg.data).classes, sizes)


def _census(grid: Grid, cfg: Config, tracker: RunTracker, known: Known) -> Census:
    """Ask every client what it holds (`fl_lightning.server.census`); draw the label histogram
    from the counts clients sent, or say why there is none."""
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
    start = initial.to_torch_state_dict()
    return final.keys() == start.keys() and all(torch.equal(final[k], start[k]) for k in start)
