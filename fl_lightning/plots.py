"""Figures of a run: accuracy/loss curves per round, per-client label histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs are headless (servers, CI, Ray workers)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

CURVES = (
    ("accuracy", ("centralized/accuracy", "distributed/accuracy")),
    ("loss", ("centralized/loss", "distributed/loss", "train/loss")),
)


def curves_figure(history: dict[int, dict[str, float]]) -> Figure:
    """Centralized and distributed accuracy and loss against the round."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for axis, (title, tags) in zip(axes, CURVES, strict=True):
        for tag in tags:
            points = sorted((r, m[tag]) for r, m in history.items() if tag in m)
            if points:
                rounds, values = zip(*points, strict=True)
                axis.plot(rounds, values, marker="o", label=tag)
        axis.set_xlabel("round")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    return figure


def label_histogram_figure(counts: np.ndarray, classes: tuple[str, ...]) -> Figure:
    """Stacked bars: how many samples of each class each client holds."""
    num_clients = counts.shape[0]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.12 * num_clients + 4), 4), layout="constrained")
    bottom = np.zeros(num_clients)
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
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
    """Write `figure` as a PNG and release it."""
    figure.savefig(path, dpi=100)
    plt.close(figure)
