"""Figures of a run: accuracy/loss curves per round, per-client label histograms."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

# Curves of at most this many metrics (one panel each): a module may log dozens.
MAX_PANELS = 4
_STAGE = re.compile(r"^(centralized|distributed|train|training|val|valid|validation|test)[/_]")


def metric_base(tag: str) -> str:
    """A metric's name without its stage (`test/accuracy`, `val_acc` -> `accuracy`, `acc`)."""
    return _STAGE.sub("", tag)


def curves_figure(history: dict[int, dict[str, float]], tags: list[str]) -> Figure:
    """One panel per metric the server evaluates centrally, against the round.

    Each panel also draws the clients' metrics of the same name (`val/accuracy` with
    `test/accuracy`, `train/loss` with `test/loss`). `tags` are the metrics to draw.
    """
    central = [t for t in history.get(0, {}) if t in tags] or tags
    bases = list(dict.fromkeys(metric_base(t) for t in central))[:MAX_PANELS]
    # Matplotlib's object API: no pyplot state, no backend chosen for the process.
    figure = Figure(figsize=(5 * max(1, len(bases)), 4), layout="constrained")
    axes = figure.subplots(1, max(1, len(bases)), squeeze=False)
    for axis, base in zip(axes[0], bases, strict=False):
        for tag in (t for t in tags if metric_base(t) == base):
            points = sorted((r, m[tag]) for r, m in history.items() if tag in m)
            if points:
                rounds, values = zip(*points, strict=True)
                axis.plot(rounds, values, marker="o", label=tag)
        axis.set_xlabel("round")
        axis.set_title(base)
        axis.grid(alpha=0.3)
        axis.legend()
    return figure


def label_histogram_figure(counts: np.ndarray, classes: tuple[str, ...]) -> Figure:
    """Stacked bars: how many samples of each class each client holds."""
    num_clients = counts.shape[0]
    figure = Figure(figsize=(max(6.0, 0.12 * num_clients + 4), 4), layout="constrained")
    axis = figure.subplots()
    bottom = np.zeros(num_clients)
    colours = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for index, name in enumerate(classes):
        axis.bar(
            range(num_clients),
            counts[:, index],
            bottom=bottom,
            label=name,
            color=colours(index % 20),
        )
        bottom += counts[:, index]
    axis.set_xlabel("client (partition id)")
    axis.set_ylabel("training samples")
    axis.set_title("label distribution per client")
    axis.legend(ncols=2, fontsize="small", loc="upper right")
    return figure


def save(figure: Figure, path: Path) -> None:
    """Write `figure` as a PNG (Agg, whatever the process's backend)."""
    figure.savefig(path, dpi=100)
