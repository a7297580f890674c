"""Per-round results, written as each round ends: metrics.jsonl, TensorBoard, console, summary."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from fl_lightning.server import plots
from fl_lightning.server.rundir import RunDir

# A round record's bookkeeping and per-client views, next to the module's metrics and the
# ledger's `epsilon`: logged everywhere, not shown on the console line or in summary.md.
NOT_SHOWN = ("seconds", "failures", "rejected", "skipped", "epsilon_mean")
NOT_SHOWN_PREFIXES = ("time/", "secure_aggregation/", "clients/")


def shown(tag: str) -> bool:
    """Whether `tag` is a metric of the module (or epsilon), shown on the console and in tables."""
    return tag not in NOT_SHOWN and not tag.startswith(NOT_SHOWN_PREFIXES)


class RunTracker:
    """Writes one round's metrics everywhere at once, so every sink shows the same numbers."""

    def __init__(
        self,
        run: RunDir,
        num_rounds: int,
        hparams: dict[str, Any],
        console: bool = True,
        loggers: Sequence[Logger] = (),
    ) -> None:
        self.run = run
        self.num_rounds = num_rounds
        self.history: dict[int, dict[str, float]] = {}
        self.tensorboard = TensorBoardLogger(save_dir=run.path, name="tensorboard", version="")
        # The user's own trackers (output.loggers) get what TensorBoard gets.
        self.loggers: list[Logger] = [self.tensorboard, *loggers]
        for logger in self.loggers:
            logger.log_hyperparams(_flatten(hparams))
        # A bar only on a terminal: in a log (a deployment's stream, CI) it is noise.
        self.progress = tqdm(
            total=num_rounds,
            unit="round",
            desc="federated",
            disable=not (console and sys.stderr.isatty()),
            leave=False,
        )
        self.console = console
        self.notes: list[str] = []
        self._told_no_metrics = False

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """Record the metrics of a finished round (round 0: the initial model)."""
        self.history[server_round] = dict(metrics)
        record: dict[str, Any] = {"round": server_round}
        record.update({tag: _finite_or_none(value) for tag, value in metrics.items()})
        with self.run.metrics.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        scalars = {tag: value for tag, value in metrics.items() if tag != "seconds"}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=server_round)
            logger.save()
        self.tensorboard.experiment.flush()
        if self.console:
            seconds = metrics.get("seconds", 0.0)
            line = "  ".join(f"{tag} {value:.4f}" for tag, value in metrics.items() if shown(tag))
            self.progress.write(f"round {server_round}/{self.num_rounds}  {line}  ({seconds:.1f}s)")
            if server_round > 0:
                self.progress.update(1)
        if server_round > 0 and not self._told_no_metrics and _silent(metrics):
            self._told_no_metrics = True
            self.note(
                "the module logged no metrics this round (no self.log in its steps, or "
                "nothing on the epoch), so the rounds show fl-lightning's timings only"
            )

    def note(self, text: str) -> None:
        """A line for the console and summary.md (why a run stopped early, what was changed)."""
        self.notes.append(text)
        if self.console:
            self.progress.write(text)

    def log_label_histogram(self, counts: np.ndarray, classes: tuple[str, ...]) -> None:
        """Write each client's training-label counts (JSON, PNG, TensorBoard figure)."""
        self.run.label_histogram.write_text(
            json.dumps({"classes": list(classes), "counts": counts.tolist()}, indent=1)
        )
        figure = plots.label_histogram_figure(counts, classes)
        self.tensorboard.experiment.add_figure("data/label_histogram", figure, close=False)
        plots.save(figure, self.run.label_histogram.with_suffix(".png"))

    def close(self) -> None:
        """Write curves.png and summary.md, and flush TensorBoard."""
        self.progress.close()
        for logger in self.loggers:
            logger.finalize("success")
        if self.history:
            tags = list(dict.fromkeys(t for m in self.history.values() for t in m if shown(t)))
            plots.save(plots.curves_figure(self.history, tags), self.run.curves)
        self.run.summary.write_text(self.summary_markdown())

    def summary_markdown(self) -> str:
        """Table III of the seed report: a row per metric, a column per round."""
        rounds = sorted(r for r in self.history if r > 0)
        lines = [
            f"# Run summary: {self.run.path.name}",
            "",
            "| Metric | " + " | ".join(f"Round {r}" for r in rounds) + " |",
            "|---|" + "---|" * len(rounds),
        ]
        tags = dict.fromkeys(t for r in rounds for t in self.history[r] if shown(t))
        for tag in tags:
            cells = [_format(tag, self.history[r].get(tag)) for r in rounds]
            lines.append(f"| {tag} | " + " | ".join(cells) + " |")
        initial = self.history.get(0, {})
        total = sum(m.get("seconds", 0.0) for m in self.history.values())
        evaluated = ", ".join(f"{t} {_format(t, v)}" for t, v in initial.items() if shown(t))
        lines += [
            "",
            f"Initial model (centralized): {evaluated or '-'}.",
            f"Wall time of the rounds: {total:.1f} s.",
        ]
        lines += [f"{text}." if not text.endswith(".") else text for text in self.notes]
        if self.run.curves.exists():
            lines += ["", f"![metrics per round]({self.run.curves.name})"]
        lines.append("")
        return "\n".join(lines)


def _silent(metrics: dict[str, float]) -> bool:
    """Whether a round whose clients all replied holds no metric of the module."""
    return (
        not metrics.get("failures")
        and not metrics.get("skipped")
        and not any(shown(tag) for tag in metrics)
    )


def add_client_report(run: RunDir, rows: list[dict[str, Any]]) -> None:
    """The per-client before/after-FL report, added to a written run: clients.json, its
    TensorBoard scalars and text, and a section at the end of summary.md."""
    run.clients.write_text(json.dumps(rows, indent=2) + "\n")
    table = clients_markdown(rows)
    writer = SummaryWriter(str(run.tensorboard))
    try:
        for row in rows:
            for key in ("before_fl_accuracy", "after_fl_accuracy"):
                writer.add_scalar(f"clients/{key}", row[key], row["client"])
        writer.add_text("clients", table)
    finally:
        writer.close()
    section = "## Clients: trained alone (before FL) and federated (after FL)"
    summary = run.summary.read_text().rstrip("\n")
    run.summary.write_text(f"{summary}\n\n{section}\n\n{table}\n")


def clients_markdown(rows: list[dict[str, Any]]) -> str:
    """One row per client: clean or noisy, accuracy before and after FL."""
    lines = [
        "| Client | Data | Accuracy before FL | Accuracy after FL |",
        "|---|---|---|---|",
    ]
    for row in rows:
        kind = "noisy" if row["noisy"] else "clean"
        lines.append(
            f"| {row['client']} | {kind} | {100 * row['before_fl_accuracy']:.2f}% | "
            f"{100 * row['after_fl_accuracy']:.2f}% |"
        )
    return "\n".join(lines)


def _format(tag: str, value: float | None) -> str:
    if value is None:
        return "-"
    if tag.endswith("accuracy"):
        return f"{100 * value:.2f}%"
    return f"{value:.2f}" if tag == "epsilon" else f"{value:.4f}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:  # lists, not tuples: loggers writing YAML (CSVLogger) keep it plain
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat
